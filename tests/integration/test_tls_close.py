"""Every connection the proxy ends is closed, on TLS as in the clear.

Clients that wait for the server to close after their goodbye (mbsync,
imtest, smtptest, openssl s_client) must finish through the proxy as they do
against Dovecot and slapd directly; a TLS client that never speaks, or never
answers the close alert, must not hold a socket open; and the proxy's file
descriptors come back to where they were after many such connections.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time

import pytest

from tests.conftest import require_tool, wait_until
from tests.proxyd import ProxyDaemon, mail_backend

# An LDAP unbind request (message id 1) and a simple bind request, as bytes.
UNBIND = bytes.fromhex("30050201014200")
LOGIN_TIMEOUT = 2


@pytest.fixture(scope="module")
def proxy(slapd, dovecot, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy-tls-close")
    imap = mail_backend(folder, dovecot, "imap")
    smtp = mail_backend(folder, dovecot, "smtp")
    short = {"login_timeout": LOGIN_TIMEOUT}
    daemon = ProxyDaemon(folder, slapd, {
        "imap": dict(imap, **short),
        "imaps": dict(imap, tls="implicit", **short),
        "submission": dict(smtp, **short),
        "submissions": dict(smtp, tls="implicit", **short),
        "ldap": {"protocol": "ldap", "realm": "cloud", **short},
        "ldaps": {"protocol": "ldap", "realm": "cloud", "tls": "implicit", **short},
        "imap-plain": dict(imap, tls="none", allow_plaintext_auth=True, **short),
    })
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


IMPLICIT = {"imaps", "submissions", "ldaps"}
PROTOCOL = {"imap": "imap", "imaps": "imap", "submission": "smtp", "submissions": "smtp",
            "ldap": "ldap", "ldaps": "ldap"}


def run(command, *, input=b"", timeout=20):
    """Run a client to its end; a client the proxy leaves hanging fails the
    test at ``timeout`` (directly against the servers, each takes well under
    a second)."""
    started = time.monotonic()
    done = subprocess.run(command, input=input, capture_output=True, timeout=timeout)
    return done, time.monotonic() - started


# -- real clients -----------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["STARTTLS", "IMAPS"])
def test_mbsync_syncs_and_exits(proxy, dovecot, user, tmp_path, tls):
    mbsync = require_tool("mbsync")
    uid, _, secret = user
    for n in range(3):
        dovecot.deliver(uid, f"Subject: mbsync {n}\r\nMessage-ID: <m{n}@example.test>\r\n\r\n"
                             f"Body {n}.\r\n".encode())
    maildir = tmp_path / "Mail"
    maildir.mkdir()
    port = proxy.ports["imap" if tls == "STARTTLS" else "imaps"]
    config = tmp_path / "mbsyncrc"
    config.write_text(
        f"IMAPAccount proxy\nHost localhost\nPort {port}\nUser {uid}\nPass \"{secret}\"\n"
        f"SSLType {tls}\nCertificateFile {proxy.pki.ca_file}\n\n"
        "IMAPStore remote\nAccount proxy\n\n"
        f"MaildirStore local\nPath {maildir}/\nInbox {maildir}/INBOX\n\n"
        "Channel sync\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\nSyncState *\n"
    )
    done, _ = run([mbsync, "-c", str(config), "-a"])
    assert done.returncode == 0, done.stderr.decode()
    assert len(list((maildir / "INBOX" / "new").iterdir())) == 3


@pytest.mark.parametrize("listener", ["imap", "imaps"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_imtest_logs_out_and_exits(proxy, user, tmp_path, listener, mechanism):
    imtest = require_tool("imtest")
    uid, _, secret = user
    script = tmp_path / "commands"
    script.write_bytes(b"a1 NOOP\r\na2 LOGOUT\r\n")
    tls = ["-s"] if listener == "imaps" else ["-t", ""]
    done, _ = run([imtest, *tls, "-m", mechanism, "-a", uid, "-w", secret,
                   "-p", str(proxy.ports[listener]), "-f", str(script), "127.0.0.1"])
    out = done.stdout.decode(errors="replace")
    assert "a2 OK" in out, out + done.stderr.decode(errors="replace")


@pytest.mark.parametrize("listener", ["submission", "submissions"])
def test_smtptest_quits_and_exits(proxy, user, tmp_path, listener):
    smtptest = require_tool("smtptest")
    uid, _, secret = user
    script = tmp_path / "commands"
    script.write_bytes(b"NOOP\r\nQUIT\r\n")
    tls = ["-s"] if listener == "submissions" else ["-t", ""]
    done, _ = run([smtptest, *tls, "-m", "PLAIN", "-a", uid, "-w", secret,
                   "-p", str(proxy.ports[listener]), "-f", str(script), "127.0.0.1"])
    out = done.stdout.decode(errors="replace")
    assert "221" in out, out + done.stderr.decode(errors="replace")


def s_client(proxy, listener, *extra):
    command = [require_tool("openssl"), "s_client", "-connect",
               f"127.0.0.1:{proxy.ports[listener]}", "-CAfile", str(proxy.pki.ca_file),
               "-verify_return_error", "-ign_eof", "-quiet", *extra]
    if listener not in IMPLICIT:
        command += ["-starttls", PROTOCOL[listener]]
    return command


@pytest.mark.parametrize("listener,goodbye,answer", [
    ("imap", b"a LOGOUT\r\n", b"a OK"),
    ("imaps", b"a LOGOUT\r\n", b"a OK"),
    ("submission", b"QUIT\r\n", b"221"),
    ("submissions", b"QUIT\r\n", b"221"),
    ("ldap", UNBIND, b""),
    ("ldaps", UNBIND, b""),
])
def test_openssl_s_client_sees_the_close(proxy, listener, goodbye, answer):
    done, _ = run(s_client(proxy, listener), input=goodbye)
    assert answer in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("listener", ["imap", "submission"])
def test_openssl_s_client_after_login(proxy, user, listener):
    import base64

    uid, _, secret = user
    plain = base64.b64encode(f"\0{uid}\0{secret}".encode())
    if listener == "imap":
        script, answer = b"a AUTHENTICATE PLAIN " + plain + b"\r\nb LOGOUT\r\n", b"b OK"
    else:
        script, answer = b"EHLO client\r\nAUTH PLAIN " + plain + b"\r\nQUIT\r\n", b"221"
    done, _ = run(s_client(proxy, listener), input=script)
    assert answer in done.stdout, done.stdout + done.stderr


# -- what a bare TLS client sees ----------------------------------------------------------------


def tls_socket(proxy, listener):
    """A TLS connection to ``listener``; for STARTTLS listeners, upgraded.
    EOF without TLS's close alert raises (suppress_ragged_eofs=False), so a
    test that reads to b"" knows the proxy closed in order."""
    context = ssl.create_default_context(cafile=str(proxy.pki.ca_file))
    raw = socket.create_connection(("127.0.0.1", proxy.ports[listener]), timeout=10)
    if listener not in IMPLICIT:
        reader = raw.makefile("rb")
        if PROTOCOL[listener] == "imap":
            reader.readline()
            raw.sendall(b"s STARTTLS\r\n")
            assert reader.readline().startswith(b"s OK")
        elif PROTOCOL[listener] == "smtp":
            reader.readline()
            raw.sendall(b"EHLO client\r\n")
            while not reader.readline().startswith(b"250 "):
                pass
            raw.sendall(b"STARTTLS\r\n")
            assert reader.readline().startswith(b"220")
        else:
            raw.sendall(bytes.fromhex("301d02010177188016312e332e362e312e342e312e313436362e3230303337"))
            assert raw.recv(4096)[:2] == b"\x30\x0c"
    return context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)


def read_to_close(sock) -> bytes:
    """Everything until the proxy's orderly TLS close (close alert, then EOF)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


GOODBYES = {
    "imap": (b"a LOGOUT\r\n", b"* BYE"),
    "smtp": (b"QUIT\r\n", b"221"),
    "ldap": (UNBIND, b""),
}


@pytest.mark.parametrize("listener", ["imap", "imaps", "submission", "submissions", "ldap", "ldaps"])
def test_goodbye_before_login_closes_tls_in_order(proxy, listener):
    sock = tls_socket(proxy, listener)
    if PROTOCOL[listener] != "ldap" and listener in IMPLICIT:
        sock.recv(4096)  # the greeting
    goodbye, answer = GOODBYES[PROTOCOL[listener]]
    sock.sendall(goodbye)
    assert answer in read_to_close(sock)
    sock.close()


@pytest.mark.parametrize("listener", ["imaps", "submissions"])
def test_goodbye_after_login_closes_tls_in_order(proxy, user, listener):
    import base64

    uid, _, secret = user
    plain = base64.b64encode(f"\0{uid}\0{secret}".encode())
    sock = tls_socket(proxy, listener)
    if listener == "imaps":
        sock.sendall(b"a AUTHENTICATE PLAIN " + plain + b"\r\nb NOOP\r\nc LOGOUT\r\n")
        assert b"c OK" in read_to_close(sock)
    else:
        sock.sendall(b"EHLO client\r\nAUTH PLAIN " + plain + b"\r\nNOOP\r\nQUIT\r\n")
        assert b"221 " in read_to_close(sock)
    sock.close()


def test_bye_after_bad_commands_closes_tls_in_order(proxy):
    sock = tls_socket(proxy, "imaps")
    sock.sendall(b"a BOGUS\r\nb BOGUS\r\nc BOGUS\r\n")
    assert b"* BYE" in read_to_close(sock)
    sock.close()


def test_notice_of_disconnection_closes_ldaps_in_order(proxy):
    sock = tls_socket(proxy, "ldaps")
    sock.sendall(b"\x30\x03\x02\x01\x01")  # a message with no operation: malformed
    data = read_to_close(sock)
    assert b"1.3.6.1.4.1.1466.20036" in data  # the notice of disconnection's name
    sock.close()


# What the proxy says when the login deadline passes (the LDAP one inside a
# notice of disconnection).
TIMEOUT_GOODBYES = {
    "imap": b"* BYE Idle for too long.\r\n",
    "smtp": b"421 4.7.0 Idle for too long.\r\n",
    "ldap": b"idle for too long",
}


@pytest.mark.parametrize("listener", ["imap", "imaps", "submission", "submissions", "ldap", "ldaps"])
def test_login_timeout_closes_a_silent_tls_connection(proxy, listener):
    """A TLS client that says nothing more gets the timeout's goodbye at the
    login deadline (counted from connect), then an orderly close: close
    alert, then EOF (read_to_close raises on an EOF without the alert)."""
    started = time.monotonic()
    sock = tls_socket(proxy, listener)
    sock.settimeout(LOGIN_TIMEOUT + 15)
    data = read_to_close(sock)
    elapsed = time.monotonic() - started
    sock.close()
    goodbye = TIMEOUT_GOODBYES[PROTOCOL[listener]]
    if PROTOCOL[listener] == "ldap":
        assert goodbye in data and b"1.3.6.1.4.1.1466.20036" in data, data
    else:
        assert data.endswith(goodbye), data
    assert LOGIN_TIMEOUT - 0.1 <= elapsed < LOGIN_TIMEOUT + 10, elapsed


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def established(port: int) -> int:
    """Sockets of the proxy's on ``port`` still connected."""
    out = subprocess.run([require_tool("ss"), "-Htn", "state", "established",
                          f"( sport = :{port} )"], capture_output=True, text=True).stdout
    return len(out.splitlines())


@pytest.mark.parametrize("kind", ["no handshake", "handshake", "no close alert"])
def test_silent_tls_connections_give_their_descriptors_back(proxy, kind):
    """200 TLS connections on IMAPS that never log in: ones that never start
    TLS, ones that finish the handshake and say nothing, and ones that say
    goodbye but never answer the proxy's close alert (nor read). Once the
    login timeout and the close deadline pass, the proxy holds none of them."""
    pid = proxy.process.pid
    port = proxy.ports["imaps"]
    # What the daemon opens once, on its first connections (its thread
    # pools' descriptors), is not a leak: counted from after a first round.
    warm = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert wait_until(lambda: established(port) == 0, LOGIN_TIMEOUT + 20)
    warm.close()
    before = open_descriptors(pid)
    context = ssl.create_default_context(cafile=str(proxy.pki.ca_file))
    sockets = []
    for _ in range(200):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        if kind == "no handshake":
            sockets.append(raw)
            continue
        sock = context.wrap_socket(raw, server_hostname="localhost")
        if kind == "no close alert":
            sock.sendall(b"a LOGOUT\r\n")
        sockets.append(sock)
    assert established(port) > 0
    # Descriptors return once every connection is closed on the proxy's side.
    assert wait_until(lambda: established(port) == 0, LOGIN_TIMEOUT + 20), \
        f"{established(port)} connections still open on the proxy's side"
    assert wait_until(lambda: open_descriptors(pid) <= before, 10), \
        f"{open_descriptors(pid)} descriptors, {before} before"
    for sock in sockets:
        sock.close()


def test_plaintext_still_closes_at_once(proxy):
    sock = socket.create_connection(("127.0.0.1", proxy.ports["imap-plain"]), timeout=10)
    sock.recv(4096)
    sock.sendall(b"a LOGOUT\r\n")
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    assert b"a OK" in data
    sock.close()
