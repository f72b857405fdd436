"""The IMAP front end, end to end: the real daemon between real clients
(imaplib, curl, fetchmail) and a real Dovecot, deciding against a real slapd."""

from __future__ import annotations

import base64
import imaplib
import os
import re
import socket
import ssl
import subprocess
import time

import pytest

from tests.conftest import audit_text, require_tool
from tests.integration.conftest import PRIMARY
from tests.proxyd import ProxyDaemon, free_port, mail_backend



@pytest.fixture(scope="module")
def proxy(slapd, dovecot, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy-imap")
    backend = mail_backend(folder, dovecot, "imap")
    daemon = ProxyDaemon(folder, slapd, {
        "imap": dict(backend),
        "imaps": dict(backend, tls="implicit"),
        "plain": dict(backend, tls="none", allow_plaintext_auth=True),
        "onprem": dict(backend, realm="on-premises"),
        "tls-backend": dict(backend, backend_starttls=True, backend_ca_file=str(dovecot.ca_file)),
        "dovecot-style": dict(backend, backend_login="dovecot"),
        "nowhere": dict(backend, backend=f"imap://127.0.0.1:{free_port()}", backend_timeout=3),
    })
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def context(proxy):
    return ssl.create_default_context(cafile=str(proxy.pki.ca_file))


def starttls(proxy, listener="imap"):
    client = imaplib.IMAP4("127.0.0.1", proxy.ports[listener], timeout=30)
    client.starttls(context(proxy))
    return client


def message(subject, body=b"Hello.\r\n"):
    return (b"From: sender@example.test\r\nTo: someone@example.test\r\nSubject: " +
            subject.encode() + b"\r\nMessage-ID: <" + subject.encode() + b"@example.test>\r\n\r\n"
            + body)


def fetch_all(client):
    typ, _ = client.select("INBOX")
    assert typ == "OK"
    typ, data = client.uid("SEARCH", None, "ALL")
    bodies = []
    for uid in data[0].split():
        typ, parts = client.uid("FETCH", uid, "(BODY.PEEK[])")
        assert typ == "OK"
        bodies.append(parts[0][1])
    return bodies


def test_imaplib_login_after_starttls_reads_the_mailbox(proxy, dovecot, user):
    uid, _, secret = user
    dovecot.deliver(uid, message("first"))
    client = starttls(proxy)
    typ, data = client.login(uid, secret)
    assert typ == "OK"
    assert b"CAPABILITY" in data[0] and b"IDLE" in data[0]  # the backend's post-login capabilities
    assert fetch_all(client) == [message("first")]
    client.logout()


def test_authenticate_plain_and_imaps(proxy, dovecot, user):
    uid, _, secret = user
    dovecot.deliver(uid, message("second"))
    client = starttls(proxy)
    typ, _ = client.authenticate("PLAIN", lambda _: f"\0{uid}\0{secret}".encode())
    assert typ == "OK"
    assert fetch_all(client) == [message("second")]
    client.logout()
    client = imaplib.IMAP4_SSL("127.0.0.1", proxy.ports["imaps"], ssl_context=context(proxy),
                               timeout=30)
    assert client.login(uid, secret.replace(" ", "").upper())[0] == "OK"
    client.logout()


def test_before_tls_login_is_disabled(proxy, user):
    uid, _, secret = user
    client = imaplib.IMAP4("127.0.0.1", proxy.ports["imap"], timeout=30)
    assert "LOGINDISABLED" in client.capabilities and "STARTTLS" in client.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        client.login(uid, secret)
    client.shutdown()


def test_refusals_are_one_generic_answer(proxy, slapd, user, unique):
    uid, _, secret = user
    enforced = unique()
    slapd.add_user(enforced, PRIMARY, groups=["mfa"])
    for name, password, listener in ((uid, "wrong", "imap"), ("nobody-here", secret, "imap"),
                                     (enforced, PRIMARY, "imap"), (uid, secret, "onprem")):
        client = starttls(proxy, listener)
        with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\] Authentication failed"):
            client.login(name, password)
        client.shutdown()
    client = starttls(proxy, "onprem")
    assert client.login(uid, PRIMARY)[0] == "OK"
    client.logout()


def test_backend_tls_and_dovecot_style_logins(proxy, user):
    uid, _, secret = user
    for listener in ("tls-backend", "dovecot-style"):
        client = starttls(proxy, listener)
        assert client.login(uid, secret)[0] == "OK", listener
        assert client.select("INBOX")[0] == "OK"
        client.logout()


def test_an_unreachable_backend_is_a_temporary_failure(proxy, user):
    uid, _, secret = user
    client = starttls(proxy, "nowhere")
    with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
        client.login(uid, secret)
    client.shutdown()


def test_the_client_address_reaches_the_backend(proxy, dovecot, user):
    """From 127.0.0.2: the proxy's own connection to Dovecot comes from
    127.0.0.1, so Dovecot naming 127.0.0.2 shows the ID was used."""
    uid, _, secret = user
    s = socket.create_connection(("127.0.0.1", proxy.ports["plain"]), timeout=10,
                                 source_address=("127.0.0.2", 0))
    s.recv(4096)
    s.sendall(b"a LOGIN " + uid.encode() + b' "' + secret.encode() + b'"\r\nb LOGOUT\r\n')
    while s.recv(65536):
        pass
    s.close()
    line = dovecot.wait_for_log(rf"Login: user=<{re.escape(uid)}>[^\n]*", timeout=10).group(0)
    assert "rip=127.0.0.2" in line


def test_a_10_mb_message_arrives_identical(proxy, dovecot, user):
    uid, _, secret = user
    body = b"".join(b"%07d " % i + b"x" * 70 + b"\r\n" for i in range(130_000))
    big = message("big", body)
    assert len(big) > 10_000_000
    dovecot.deliver(uid, big)
    client = starttls(proxy)
    assert client.login(uid, secret)[0] == "OK"
    assert fetch_all(client) == [big] == dovecot.fetch_stored(uid)
    client.logout()


def test_curl_fetches_over_starttls_and_imaps(proxy, dovecot, user):
    curl = require_tool("curl")
    uid, _, secret = user
    dovecot.deliver(uid, message("curl"))
    for url, extra in ((f"imap://127.0.0.1:{proxy.ports['imap']}/INBOX;UID=1", ["--ssl-reqd"]),
                       (f"imaps://127.0.0.1:{proxy.ports['imaps']}/INBOX;UID=1", [])):
        done = subprocess.run([curl, "-sS", *extra, "--cacert", str(proxy.pki.ca_file),
                               "-u", f"{uid}:{secret}", url], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.replace(b"\r\n", b"\n") == message("curl").replace(b"\r\n", b"\n")


def test_fetchmail_fetches_through_the_proxy(proxy, dovecot, user, tmp_path):
    fetchmail = require_tool("fetchmail")
    uid, _, secret = user
    dovecot.deliver(uid, message("fetchmail"))
    out = tmp_path / "delivered"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"poll 127.0.0.1 service {proxy.ports['imap']} protocol IMAP auth password\n"
        f'  user "{uid}" password "{secret}" is root here\n'
        f"  sslproto TLS1.2+ sslcertck sslcertfile {proxy.pki.ca_file} sslcommonname localhost\n"
        f"  keep fetchall mda \"/bin/sh -c 'cat >> {out}'\"\n"
    )
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path)}
    done = subprocess.run([fetchmail, "-f", str(rc), "--nosyslog", "-v"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"Subject: fetchmail" in out.read_bytes()


def test_a_login_pipelined_after_starttls_is_never_executed(proxy, user):
    uid, _, secret = user
    before = audit_text(proxy.folder / "audit.log").count('"authentication"')
    s = socket.create_connection(("127.0.0.1", proxy.ports["imap"]), timeout=10)
    assert s.recv(4096).startswith(b"* OK")
    s.sendall(b"a STARTTLS\r\nb LOGIN " + uid.encode() + b' "' + secret.encode() + b'"\r\n')
    assert s.recv(4096) == b"a OK Begin TLS negotiation now.\r\n"
    tls = context(proxy).wrap_socket(s, server_hostname="localhost")
    tls.sendall(b"c CAPABILITY\r\n")
    answer = b""
    while b"c OK" not in answer:
        answer += tls.recv(4096)
    assert b"b " not in answer  # no answer to b, in the clear or after
    assert b"AUTH=PLAIN" in answer
    tls.close()
    time.sleep(0.3)
    assert audit_text(proxy.folder / "audit.log").count('"authentication"') == before


def test_three_bad_commands_and_the_connection_ends(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.ports["plain"]), timeout=10)
    s.recv(4096)
    s.sendall(b"a SELECT INBOX\r\nb FETCH 1 BODY[]\r\nc XYZZY\r\n")
    answer = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        answer += chunk
    assert answer.endswith(b"* BYE Too many invalid commands.\r\n")
    s.close()


def test_pipelined_commands_after_login_reach_the_backend(proxy, dovecot, user):
    uid, _, secret = user
    s = socket.create_connection(("127.0.0.1", proxy.ports["plain"]), timeout=10)
    s.recv(4096)
    s.sendall(b"a LOGIN " + uid.encode() + b' "' + secret.encode() + b'"\r\nb SELECT INBOX\r\n'
              b"c LOGOUT\r\n")
    answer = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        answer += chunk
    assert b"a OK [CAPABILITY" in answer and b"b OK [READ-WRITE]" in answer
    assert b"c OK" in answer
    s.close()


def test_deleting_the_app_password_ends_the_session_with_bye(proxy, user):
    uid, _, secret = user
    client = starttls(proxy)
    assert client.login(uid, secret)[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    assert proxy.cli("app-password", "delete", uid, "Outlook 2010").returncode == 0
    deadline = time.monotonic() + 10
    ended = False
    while time.monotonic() < deadline and not ended:
        try:
            client.noop()
            time.sleep(0.3)
        except (imaplib.IMAP4.abort, OSError) as e:
            ended = True
            assert "BYE" in str(e) or "Session ended" in str(e) or isinstance(e, OSError)
    assert ended


def test_sasl_ir_and_cancel_by_hand(proxy, user):
    uid, _, secret = user
    s = socket.create_connection(("127.0.0.1", proxy.ports["plain"]), timeout=10)
    s.recv(4096)
    s.sendall(b"a AUTHENTICATE PLAIN\r\n")
    assert s.recv(4096) == b"+ \r\n"
    s.sendall(b"*\r\n")
    assert s.recv(4096) == b"a BAD Authentication cancelled.\r\n"
    ir = base64.b64encode(f"\0{uid}\0{secret}".encode())
    s.sendall(b"b AUTHENTICATE PLAIN " + ir + b"\r\n")
    answer = s.recv(4096)
    assert answer.startswith(b"b OK [CAPABILITY")
    s.close()
