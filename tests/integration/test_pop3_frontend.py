"""The POP3 front end, end to end: the real daemon between real clients
(poplib, fetchmail, curl) and Dovecot's real POP3 service, deciding against a
real slapd."""

from __future__ import annotations

import poplib
import ssl
import subprocess

import pytest

from tests.conftest import require_tool
from tests.integration.conftest import PRIMARY
from tests.proxyd import ProxyDaemon


@pytest.fixture(scope="module")
def proxy(slapd, dovecot, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy-pop3")
    master = folder / "master-password"
    master.write_text(dovecot.master_password + "\n")
    master.chmod(0o600)
    backend = {"protocol": "pop3", "realm": "cloud",
               "backend": f"pop3://127.0.0.1:{dovecot.pop3_port}",
               "master_user": dovecot.master_user, "master_password_file": str(master)}
    daemon = ProxyDaemon(folder, slapd, {
        "pop3": dict(backend),
        "pop3s": dict(backend, tls="implicit"),
        "onprem": dict(backend, realm="on-premises"),
        "tls-backend": dict(backend, backend=f"pop3s://127.0.0.1:{dovecot.pop3s_port}",
                            backend_ca_file=str(dovecot.ca_file)),
        "dovecot-style": dict(backend, backend_login="dovecot", pass_client_address=False),
    })
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def context(proxy):
    return ssl.create_default_context(cafile=str(proxy.pki.ca_file))


def message(subject, body=b"Hello.\r\n"):
    return (b"From: sender@example.test\r\nTo: someone@example.test\r\nSubject: "
            + subject.encode() + b"\r\nMessage-ID: <" + subject.encode() + b"@example.test>\r\n\r\n"
            + body)


def stls(proxy, listener="pop3"):
    client = poplib.POP3("127.0.0.1", proxy.ports[listener], timeout=30)
    client.stls(context(proxy))
    return client


def retrieve_all(client) -> list[bytes]:
    count, _ = client.stat()
    return [b"\r\n".join(client.retr(i + 1)[1]) + b"\r\n" for i in range(count)]


def test_user_pass_after_stls_retrieves_the_message(proxy, dovecot, user):
    uid, _, secret = user
    body = "Grüße, ½ €.\r\n".encode() + b"x" * 70 + b"\r\n.leading dot\r\n"
    dovecot.deliver(uid, message("pop3", body))
    client = stls(proxy)
    assert "USER" in client.capa() and "STLS" not in client.capa()
    client.user(uid)
    assert client.pass_(secret).startswith(b"+OK")
    assert retrieve_all(client) == [message("pop3", body)]
    assert client.quit().startswith(b"+OK")


@pytest.mark.parametrize("listener", ["pop3s", "tls-backend", "dovecot-style"])
def test_pop3_ssl_and_the_other_backend_logins(proxy, dovecot, user, listener):
    uid, _, secret = user
    dovecot.deliver(uid, message(f"via {listener}"))
    if listener == "pop3s":
        client = poplib.POP3_SSL("127.0.0.1", proxy.ports[listener], context=context(proxy),
                                 timeout=30)
    else:
        client = stls(proxy, listener)
    client.user(uid)
    client.pass_(secret.upper())  # app passwords in any case, spaces or not
    assert message(f"via {listener}") in retrieve_all(client)
    client.quit()


def test_sasl_plain_with_an_initial_response(proxy, user):
    import base64

    uid, _, secret = user
    client = stls(proxy)
    answer = client._shortcmd("AUTH PLAIN " + base64.b64encode(f"\0{uid}\0{secret}".encode()).decode())
    assert answer.startswith(b"+OK")
    client.quit()


def test_before_tls_no_password_is_taken(proxy, user):
    uid, _, secret = user
    client = poplib.POP3("127.0.0.1", proxy.ports["pop3"], timeout=30)
    capabilities = client.capa()
    assert "STLS" in capabilities and "USER" not in capabilities and "SASL" not in capabilities
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Plaintext"):
        client.user(uid)
    client.quit()


def test_refusals_are_one_answer_with_the_auth_code(proxy, slapd, user, unique):
    uid, _, secret = user
    enforced = unique()
    slapd.add_user(enforced, PRIMARY, groups=["mfa"])
    for name, password, listener in ((uid, "wrong", "pop3"), ("nobody-here", secret, "pop3"),
                                     (enforced, PRIMARY, "pop3"), (uid, secret, "onprem")):
        client = stls(proxy, listener)
        client.user(name)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed\."):
            client.pass_(password)
        client.quit()


class FromAnotherAddress(poplib.POP3):
    """A POP3 client connecting from 127.0.0.2."""

    def _create_socket(self, timeout):
        import socket

        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=("127.0.0.2", 0))


def test_the_client_address_reaches_dovecot(proxy, dovecot, user):
    uid, _, secret = user
    since = len(dovecot.log_text())
    client = FromAnotherAddress("127.0.0.1", proxy.ports["pop3"], timeout=30)
    client.stls(context(proxy))
    client.user(uid)
    client.pass_(secret)
    client.quit()
    dovecot.wait_for_log(rf"pop3-login: Info: Login: user=<{uid}>.*rip=127\.0\.0\.2, "
                         rf"lip=127\.0\.0\.1, real_rip=127\.0\.0\.1", since=since)


def test_fetchmail_retrieves_through_the_proxy(proxy, dovecot, user, tmp_path):
    fetchmail = require_tool("fetchmail")
    uid, _, secret = user
    dovecot.deliver(uid, message("fetchmail pop3"))
    out = tmp_path / "mbox"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f'poll 127.0.0.1 service {proxy.ports["pop3"]} protocol POP3 auth password\n'
        f'  user "{uid}" password "{secret}" sslproto tls1.2+ sslcertck '
        f'sslcertfile {proxy.pki.ca_file} sslcertpath /nonexistent\n'
        f'  mda "cat >> {out}"\n'
    )
    rc.chmod(0o600)
    done = subprocess.run([fetchmail, "-f", str(rc), "--nosyslog", "-v", "--sslcommonname",
                           "localhost"], capture_output=True, text=True, timeout=60,
                          env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"Subject: fetchmail pop3" in out.read_bytes()


def test_curl_pop3s_retrieves_a_message_byte_for_byte(proxy, dovecot, user):
    curl = require_tool("curl")
    uid, _, secret = user
    dovecot.deliver(uid, message("curl pop3s"))
    done = subprocess.run([curl, "-s", "--cacert", str(proxy.pki.ca_file), "-u", f"{uid}:{secret}",
                           f"pop3s://localhost:{proxy.ports['pop3s']}/1"],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == message("curl pop3s")


def test_deleting_the_app_password_ends_the_pop3_session(proxy, user):
    uid, _, secret = user
    client = stls(proxy)
    client.user(uid)
    client.pass_(secret)
    assert proxy.cli("app-password", "delete", uid, "Outlook 2010").returncode == 0
    from tests.conftest import wait_until

    def ended():
        try:
            client.noop()
            return False
        except (poplib.error_proto, OSError):
            return True

    assert wait_until(ended, 15)
    with pytest.raises(poplib.error_proto):
        other = stls(proxy)
        other.user(uid)
        other.pass_(secret)
