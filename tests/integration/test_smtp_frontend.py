"""The SMTP submission front end, end to end: the real daemon between real
clients (smtplib, swaks, curl) and Dovecot's submission service, which
relays to a sink the tests read."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from tests.conftest import audit_text, require_tool
from tests.integration.conftest import PRIMARY
from tests.proxyd import ProxyDaemon, mail_backend



@pytest.fixture(scope="module")
def proxy(slapd, dovecot, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy-smtp")
    backend = mail_backend(folder, dovecot, "smtp")
    daemon = ProxyDaemon(folder, slapd, {
        "submission": dict(backend),
        "submissions": dict(backend, tls="implicit"),
        "plain": dict(backend, tls="none", allow_plaintext_auth=True),
        "tls-backend": dict(backend, backend_starttls=True, backend_ca_file=str(dovecot.ca_file)),
    })
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def context(proxy):
    return ssl.create_default_context(cafile=str(proxy.pki.ca_file))


def submission(proxy, listener="submission"):
    client = smtplib.SMTP("127.0.0.1", proxy.ports[listener], timeout=30)
    client.ehlo("client.example.test")
    client.starttls(context=context(proxy))
    client.ehlo("client.example.test")
    return client


def message(subject, body=b"Hello.\r\n"):
    return (b"From: sender@example.test\r\nTo: rcpt@example.test\r\nSubject: " + subject.encode()
            + b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body)


def sent_through(dovecot, since, count=1):
    found = dovecot.wait_for_messages(count, timeout=20, since=since)
    assert found is not None, "nothing reached the sink"
    return found


def test_smtplib_sends_8bit_mail_with_an_app_password(proxy, dovecot, user):
    uid, _, secret = user
    since = len(dovecot.sink_messages())
    client = submission(proxy)
    assert "auth" in client.esmtp_features and "starttls" not in client.esmtp_features
    assert "8bitmime" in client.esmtp_features
    client.login(uid, secret)
    body = "Grüße aus Köln, ½ € für alle.\r\n".encode()
    data = message("8bit", body)
    client.sendmail(f"{uid}@example.test", ["rcpt@example.test"], data,
                    mail_options=["BODY=8BITMIME"])
    client.quit()
    (got,) = sent_through(dovecot, since)
    assert got.submitted == data
    assert got.mail_from == f"{uid}@example.test" and got.rcpt_to == ["rcpt@example.test"]


def test_a_10_mb_message_arrives_byte_for_byte(proxy, dovecot, user):
    uid, _, secret = user
    since = len(dovecot.sink_messages())
    body = b"".join(b"%07d " % i + b"y" * 70 + b"\r\n" for i in range(130_000))
    data = message("big", body)
    assert len(data) > 10_000_000
    client = submission(proxy)
    client.login(uid, secret)
    client.sendmail(f"{uid}@example.test", ["rcpt@example.test"], data)
    client.quit()
    (got,) = sent_through(dovecot, since)
    assert got.submitted == data


def test_implicit_tls_and_a_tls_backend(proxy, dovecot, user):
    uid, _, secret = user
    since = len(dovecot.sink_messages())
    client = smtplib.SMTP_SSL("127.0.0.1", proxy.ports["submissions"], context=context(proxy),
                              timeout=30)
    client.login(uid, secret)
    client.sendmail(f"{uid}@example.test", ["a@example.test"], message("implicit"))
    client.quit()
    client = submission(proxy, "tls-backend")
    client.login(uid, secret)
    client.sendmail(f"{uid}@example.test", ["b@example.test"], message("tls-backend"))
    client.quit()
    got = sent_through(dovecot, since, 2)
    assert sorted(m.rcpt_to[0] for m in got) == ["a@example.test", "b@example.test"]


def test_swaks_sends_through_the_proxy(proxy, dovecot, user):
    swaks = require_tool("swaks")
    uid, _, secret = user
    since = len(dovecot.sink_messages())
    done = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(proxy.ports["submission"]), "--tls",
         "--tls-ca-path", str(proxy.pki.ca_file), "--tls-verify",
         "--auth", "PLAIN", "--auth-user", uid, "--auth-password", secret,
         "--from", f"{uid}@example.test", "--to", "swaks@example.test",
         "--header", "Subject: via swaks", "--body", "Sent by swaks."],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    (got,) = sent_through(dovecot, since)
    assert got.rcpt_to == ["swaks@example.test"] and b"Subject: via swaks" in got.data


def test_curl_sends_over_starttls_and_implicit_tls(proxy, dovecot, user, tmp_path):
    curl = require_tool("curl")
    uid, _, secret = user
    since = len(dovecot.sink_messages())
    mail = tmp_path / "mail.eml"
    mail.write_bytes(message("curl"))
    for url, extra in ((f"smtp://127.0.0.1:{proxy.ports['submission']}", ["--ssl-reqd"]),
                       (f"smtps://127.0.0.1:{proxy.ports['submissions']}", [])):
        done = subprocess.run(
            [curl, "-sS", *extra, "--cacert", str(proxy.pki.ca_file), "-u", f"{uid}:{secret}",
             "--mail-from", f"{uid}@example.test", "--mail-rcpt", "curl@example.test",
             "--upload-file", str(mail), url], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
    got = sent_through(dovecot, since, 2)
    assert all(m.submitted.replace(b"\r\n", b"\n") == message("curl").replace(b"\r\n", b"\n")
               for m in got)


def test_refusals(proxy, slapd, user, unique):
    uid, _, secret = user
    enforced = unique()
    slapd.add_user(enforced, PRIMARY, groups=["mfa"])
    for name, password in ((uid, "wrong"), ("nobody-here", secret), (enforced, PRIMARY)):
        client = submission(proxy)
        with pytest.raises(smtplib.SMTPAuthenticationError) as raised:
            client.login(name, password)
        assert raised.value.smtp_code == 535
        assert raised.value.smtp_error.startswith(b"5.7.8")
        client.close()


def raw(proxy, listener="plain"):
    s = socket.create_connection(("127.0.0.1", proxy.ports[listener]), timeout=10)
    assert s.recv(4096).startswith(b"220 ")
    return s


def read_until_closed(s):
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_mail_before_auth_and_auth_before_tls(proxy):
    s = raw(proxy, "submission")
    s.sendall(b"EHLO x\r\n")
    ehlo = s.recv(4096)
    assert b"STARTTLS" in ehlo and b"AUTH" not in ehlo
    s.sendall(b"MAIL FROM:<a@example.test>\r\n")
    assert s.recv(4096) == b"530 5.7.0 Authentication required\r\n"
    s.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0a\0b") + b"\r\n")
    assert s.recv(4096) == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    s.sendall(b"QUIT\r\n")
    assert read_until_closed(s) == b"221 2.0.0 Bye\r\n"


def test_an_auth_pipelined_after_starttls_is_never_executed(proxy, user):
    uid, _, secret = user
    before = audit_text(proxy.folder / "audit.log").count('"authentication"')
    s = raw(proxy, "submission")
    s.sendall(b"EHLO x\r\n")
    s.recv(4096)
    plain = base64.b64encode(f"\0{uid}\0{secret}".encode())
    s.sendall(b"STARTTLS\r\nAUTH PLAIN " + plain + b"\r\n")
    assert s.recv(4096) == b"220 2.0.0 Ready to start TLS\r\n"
    tls = context(proxy).wrap_socket(s, server_hostname="localhost")
    tls.sendall(b"NOOP\r\n")
    assert tls.recv(4096) == b"250 2.0.0 OK\r\n"  # nothing answered for the AUTH
    tls.sendall(b"AUTH PLAIN " + plain + b"\r\n")
    assert tls.recv(4096) == b"503 5.5.1 Error: send EHLO first\r\n"  # the EHLO was forgotten
    tls.close()
    time.sleep(0.3)
    assert audit_text(proxy.folder / "audit.log").count('"authentication"') == before


def test_pipelined_mail_after_auth_reaches_the_backend(proxy, dovecot, user):
    uid, _, secret = user
    since = len(dovecot.sink_messages())
    s = raw(proxy)
    plain = base64.b64encode(f"\0{uid}\0{secret}".encode())
    s.sendall(b"EHLO x\r\nAUTH PLAIN " + plain + b"\r\nMAIL FROM:<" + uid.encode() +
              b"@example.test>\r\nRCPT TO:<pipe@example.test>\r\nDATA\r\n")
    answer = b""
    while answer.count(b"\r\n354") == 0:
        answer += s.recv(4096)
    assert b"235 2.7.0" in answer
    s.sendall(b"Subject: pipelined\r\n\r\n..dot-stuffed\r\n.\r\nQUIT\r\n")
    read_until_closed(s)
    (got,) = sent_through(dovecot, since)
    assert got.rcpt_to == ["pipe@example.test"] and got.submitted.endswith(b".dot-stuffed\r\n")


def test_base64_errors_cancel_and_the_hard_error_limit(proxy):
    s = raw(proxy)
    s.sendall(b"EHLO x\r\nAUTH PLAIN\r\n")
    answer = b""
    while not answer.endswith(b"334 \r\n"):
        answer += s.recv(4096)
    s.sendall(b"@@@\r\n")
    assert s.recv(4096) == b"501 5.5.2 Cannot decode response\r\n"
    s.sendall(b"AUTH LOGIN\r\n")
    assert s.recv(4096) == b"334 VXNlcm5hbWU6\r\n"
    s.sendall(b"*\r\n")
    assert s.recv(4096) == b"501 5.0.0 Authentication cancelled\r\n"
    s.sendall(b"BOGUS\r\n" * 30)
    data = read_until_closed(s)
    assert data.endswith(b"421 4.7.0 Error: too many errors\r\n")


def test_deleting_the_app_password_ends_the_session(proxy, user):
    uid, _, secret = user
    client = submission(proxy)
    client.login(uid, secret)
    assert client.noop()[0] == 250
    assert proxy.cli("app-password", "delete", uid, "Outlook 2010").returncode == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            code, _ = client.noop()
        except smtplib.SMTPServerDisconnected:
            break
        if code == 421:
            break
        time.sleep(0.3)
    else:
        pytest.fail("the session went on")


def test_proxy_only_commands_never_reach_the_backend_after_auth(proxy, dovecot, user):
    """The backend trusts the proxy's address with XCLIENT (Dovecot: a
    trusted network; Postfix: smtpd_authorized_xclient_hosts); a client
    saying it through the proxy would become someone else. The proxy
    answers it itself, in turn, even when pipelined, and does not offer it."""
    uid, _, secret = user
    since = len(dovecot.sink_messages())
    client = submission(proxy)
    client.login(uid, secret)
    code, text = client.ehlo("client.example.test")
    assert code == 250 and b"XCLIENT" not in text.upper() and b"XFORWARD" not in text.upper()
    assert client.docmd("XCLIENT", "LOGIN=bob ADDR=192.0.2.1") == (
        550, b"5.7.1 Error: XCLIENT is not allowed")
    assert client.docmd("XFORWARD", "ADDR=192.0.2.1")[0] == 550
    # Pipelined behind other commands, and after a DATA the backend refused.
    sock = client.sock
    sock.sendall(b"RSET\r\nDATA\r\nXCLIENT LOGIN=bob\r\nNOOP\r\n")
    replies = b""
    while replies.count(b"\r\n") < 4:
        replies += sock.recv(4096)
    lines = replies.split(b"\r\n")
    assert lines[0].startswith(b"250") and lines[1][:1] == b"5"  # RSET; DATA with no recipient
    assert lines[2] == b"550 5.7.1 Error: XCLIENT is not allowed" and lines[3].startswith(b"250")
    client.sendmail(f"{uid}@example.test", ["rcpt@example.test"], message("after xclient"))
    client.quit()
    (got,) = sent_through(dovecot, since)
    assert got.mail_from == f"{uid}@example.test"


def read_replies(sock, count):
    data = b""
    while data.count(b"\r\n") < count or not data.endswith(b"\r\n"):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return [line for line in data.split(b"\r\n") if line]


def test_smuggling_by_bare_lf_or_bdat_reaches_no_backend(proxy, dovecot, user):
    """What some backends take for the end of a message (a bare LF before
    the dot), or for commands (the chunk of a BDAT they refuse), is seen by
    the proxy the same way: XCLIENT hidden there is still refused."""
    uid, _, secret = user
    since = len(dovecot.sink_messages())
    client = submission(proxy)
    client.login(uid, secret)
    sock = client.sock
    sock.sendall(f"MAIL FROM:<{uid}@example.test>\r\nRCPT TO:<rcpt@example.test>\r\nDATA\r\n".encode())
    assert [r[:3] for r in read_replies(sock, 3)] == [b"250", b"250", b"354"]
    sock.sendall(b"Subject: smuggled\r\n\r\nhi\n.\nXCLIENT LOGIN=bob\r\nNOOP\r\n")
    replies = read_replies(sock, 3)
    assert replies[0][:3] == b"250"
    assert replies[1] == b"550 5.7.1 Error: XCLIENT is not allowed"
    assert replies[2][:3] == b"250"
    chunk = b"XCLIENT LOGIN=bob\r\n"
    sock.sendall(b"BDAT %d\r\n" % len(chunk) + chunk + b"NOOP\r\n")  # no MAIL: refused
    replies = read_replies(sock, 2)
    assert replies[0].startswith(b"503 5.5.1") and replies[1][:3] == b"250"
    client.quit()
    (got,) = sent_through(dovecot, since)
    assert got.mail_from == f"{uid}@example.test" and b"hi\r\n" in got.submitted
