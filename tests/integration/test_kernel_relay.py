"""The relay in the kernel (splice), end to end: plain TCP on both sides of
the real daemon, real Dovecot behind it, clients that read fast, slowly or
not at all, and every way a session ends while the kernel relays it."""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import socket
import time

import pytest

from tests.dovecot import dovecot_username
from tests.integration.test_metrics import curl, value
from tests.proxyd import ProxyDaemon, free_port, mail_backend


@pytest.fixture(scope="module")
def proxy(slapd, dovecot, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy-kernel-relay")
    port = free_port()
    imap = mail_backend(folder, dovecot, "imap")
    pop3 = dict(imap, protocol="pop3", backend=f"pop3://127.0.0.1:{dovecot.pop3_port}")
    daemon = ProxyDaemon(folder, slapd, {
        "imap": dict(imap, tls="none", allow_plaintext_auth=True),
        "idle": dict(imap, tls="none", allow_plaintext_auth=True, idle_timeout="2s"),
        "starttls": dict(imap),
        "pop3": dict(pop3, tls="none", allow_plaintext_auth=True),
    }, extra=f"metrics:\n  endpoint: tcp:{port}:interface=127.0.0.1\n")
    daemon.metrics_port = port
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def message(subject: str, size: int) -> bytes:
    lines = size // 80 + 1
    body = b"".join(b"%07d " % i + b"k" * 70 + b"\r\n" for i in range(lines))
    return (b"From: sender@example.test\r\nTo: someone@example.test\r\nSubject: " +
            subject.encode() + b"\r\n\r\n" + body)


def paths(proxy, listener):
    code, text = curl(proxy, "/metrics")
    assert code == 200
    return {path: value(text, "legacy_auth_proxy_relayed_sessions_total", listener=listener,
                        path=path) for path in ("kernel", "python")}


def open_fds(proxy) -> int:
    return len(os.listdir(f"/proc/{proxy.process.pid}/fd"))


def login(proxy, uid, secret, listener="imap", rcvbuf=None):
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect(("127.0.0.1", proxy.ports[listener]))
    s.recv(4096)
    s.sendall(b"a LOGIN " + uid.encode() + b' "' + secret.encode() + b'"\r\n')
    assert b"a OK" in until(s, b"a ")
    return s


def nothing_left_behind(proxy, baseline: int) -> None:
    """Within 10 s, the daemon holds no more descriptors than ``baseline``
    and no IMAP session."""
    deadline = time.monotonic() + 10
    while open_fds(proxy) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(proxy) <= baseline
    code, text = curl(proxy, "/metrics")
    assert value(text, "legacy_auth_proxy_sessions", listener="imap") == 0


def to_the_end(s) -> bytes:
    """Everything until the proxy closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def until(s, tag: bytes, slow: bool = False) -> bytes:
    """Read until the tagged answer's line has arrived whole."""
    data = b""
    while not ((data.startswith(tag) or b"\r\n" + tag in data) and data.endswith(b"\r\n")):
        chunk = s.recv(4096 if slow else 1 << 20)
        if not chunk:
            raise ConnectionError(f"closed before {tag!r}: {data[-200:]!r}")
        data += chunk
        if slow and len(data) < 3_000_000:
            time.sleep(0.002)
    return data


def test_a_large_message_both_ways_byte_for_byte_in_the_kernel(proxy, dovecot, user):
    uid, _, secret = user
    before = paths(proxy, "imap")
    big = message("down", 12_000_000)
    dovecot.deliver(uid, big)
    client = imaplib.IMAP4("127.0.0.1", proxy.ports["imap"], timeout=60)
    assert client.login(uid, secret)[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    typ, parts = client.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and parts[0][1] == big
    up = message("up", 6_000_000)
    assert client.append("INBOX", None, None, up)[0] == "OK"
    client.logout()
    assert dovecot.fetch_stored(uid)[-1] == up
    after = paths(proxy, "imap")
    assert after["kernel"] == before["kernel"] + 1
    assert after["python"] == before["python"]


def test_a_slow_reader_gets_every_byte_and_the_fast_ones_are_not_held(proxy, dovecot, user):
    uid, _, secret = user
    big = message("slow", 8_000_000)
    dovecot.deliver(uid, big)
    slow = login(proxy, uid, secret, rcvbuf=8192)
    slow.sendall(b"b SELECT INBOX\r\nc FETCH 1 BODY.PEEK[]\r\n")
    # Meanwhile another session of the same user is answered at once.
    other = login(proxy, uid, secret)
    started = time.monotonic()
    other.sendall(b"x NOOP\r\n")
    assert b"x OK" in until(other, b"x ")
    assert time.monotonic() - started < 5
    other.sendall(b"y LOGOUT\r\n")
    other.close()
    data = until(slow, b"c ", slow=True)
    assert big in data
    slow.sendall(b"d LOGOUT\r\n")
    assert b"d OK" in until(slow, b"d ")
    slow.close()


def test_logout_ends_both_connections_with_the_backends_goodbye_only(proxy, user):
    uid, _, secret = user
    s = login(proxy, uid, secret)
    s.sendall(b"b LOGOUT\r\n")
    rest = to_the_end(s)
    assert rest.startswith(b"* BYE Logging out\r\nb OK Logout completed")
    assert rest.count(b"\r\n") == 2
    assert b"closed the connection" not in rest
    s.close()


def test_pipelined_commands_behind_the_login_arrive_in_order(proxy, user):
    uid, _, secret = user
    s = socket.create_connection(("127.0.0.1", proxy.ports["imap"]), timeout=30)
    s.recv(4096)
    s.sendall(b"a LOGIN " + uid.encode() + b' "' + secret.encode() + b'"\r\n'
              + b"".join(b"n%d NOOP\r\n" % i for i in range(50)) + b"z LOGOUT\r\n")
    answer = to_the_end(s)
    lines = answer.split(b"\r\n")
    tags = [line.split(b" ", 1)[0] for line in lines if line[:1] in (b"a", b"n", b"z")]
    assert tags == [b"a"] + [b"n%d" % i for i in range(50)] + [b"z"]
    s.close()


def test_deleting_the_app_password_ends_a_kernel_relayed_session_with_bye(proxy, unique):
    uid = unique()
    proxy.slapd.add_user(uid, "primary-password-1")
    secret = proxy.create_app_password(uid, "Printer")
    s = login(proxy, uid, secret)
    s.sendall(b"b SELECT INBOX\r\n")
    until(s, b"b ")
    assert proxy.cli("app-password", "delete", uid, "Printer").returncode == 0
    rest = to_the_end(s)
    assert b"* BYE Session ended" in rest
    s.close()


def test_the_idle_timeout_ends_a_kernel_relayed_session(proxy, user):
    uid, _, secret = user
    s = login(proxy, uid, secret, listener="idle")
    s.sendall(b"b NOOP\r\n")
    until(s, b"b ")
    rest = to_the_end(s)
    assert rest == b"* BYE Idle for too long.\r\n"
    s.close()


def test_a_session_the_backend_ends_is_closed_for_the_client(proxy, dovecot, user):
    uid, _, secret = user
    s = login(proxy, uid, secret)
    s.sendall(b"b SELECT INBOX\r\n")
    until(s, b"b ")
    dovecot._doveadm("kick", dovecot_username(uid))
    rest = to_the_end(s)
    assert b"* BYE" in rest
    s.close()


def test_a_client_that_closes_while_the_kernel_relays_ends_both_connections(proxy, user):
    uid, _, secret = user
    login(proxy, uid, secret).close()  # the pool is filled for the logins below
    time.sleep(0.3)
    baseline = open_fds(proxy)
    for _ in range(3):
        s = login(proxy, uid, secret)
        s.sendall(b"b NOOP\r\n")
        assert b"b OK" in until(s, b"b ")
        s.close()  # its end of stream, read by the kernel's relay
    nothing_left_behind(proxy, baseline)


def test_a_client_that_vanishes_mid_message_leaves_nothing_behind(proxy, dovecot, user):
    uid, _, secret = user
    dovecot.deliver(uid, message("vanish", 8_000_000))
    baseline = None
    for round in range(6):
        s = login(proxy, uid, secret, rcvbuf=8192)
        s.sendall(b"b SELECT INBOX\r\nc FETCH 1 BODY.PEEK[]\r\n")
        s.recv(100_000)
        # A reset, mid-message, with bytes waiting in the proxy's pipe.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        time.sleep(0.3)
        if round == 0:
            baseline = open_fds(proxy)
    nothing_left_behind(proxy, baseline)


def test_tls_on_the_client_side_relays_in_python(proxy, dovecot, user):
    import ssl
    uid, _, secret = user
    before = paths(proxy, "starttls")
    big = message("tls", 3_000_000)
    dovecot.deliver(uid, big)
    client = imaplib.IMAP4("127.0.0.1", proxy.ports["starttls"], timeout=60)
    client.starttls(ssl.create_default_context(cafile=str(proxy.pki.ca_file)))
    assert client.login(uid, secret)[0] == "OK"
    client.select("INBOX")
    typ, data = client.search(None, "ALL")
    last = data[0].split()[-1]
    assert client.fetch(last, "(BODY.PEEK[])")[1][0][1] == big
    client.logout()
    after = paths(proxy, "starttls")
    assert after["python"] == before["python"] + 1 and after["kernel"] == before["kernel"]


def test_pop3_retrieves_a_large_message_in_the_kernel(proxy, dovecot, unique):
    uid = unique()
    proxy.slapd.add_user(uid, "primary-password-1")
    secret = proxy.create_app_password(uid, "Scanner")
    big = message("pop3", 5_000_000)
    dovecot.deliver(uid, big)
    before = paths(proxy, "pop3")
    client = poplib.POP3("127.0.0.1", proxy.ports["pop3"], timeout=60)
    client.user(uid)
    client.pass_(secret)
    _, lines, _ = client.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == big
    client.quit()
    assert paths(proxy, "pop3")["kernel"] == before["kernel"] + 1


def test_a_slow_reader_over_tls_gets_every_byte_in_order(proxy, dovecot, user):
    """The relay in Python, over TLS: records read out together and sent as
    the kernel takes them, the rest queued; a reader slower than the backend."""
    import ssl
    uid, _, secret = user
    big = message("slow-tls", 6_000_000)
    dovecot.deliver(uid, big)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    raw.settimeout(30)
    raw.connect(("127.0.0.1", proxy.ports["starttls"]))
    raw.recv(4096)
    raw.sendall(b"s STARTTLS\r\n")
    assert b"s OK" in until(raw, b"s ")
    s = ssl.create_default_context(cafile=str(proxy.pki.ca_file)).wrap_socket(
        raw, server_hostname="localhost")
    s.sendall(b"a LOGIN " + uid.encode() + b' "' + secret.encode() + b'"\r\n')
    assert b"a OK" in until(s, b"a ")
    s.sendall(b"b SELECT INBOX\r\n")
    count = int(re.search(rb"\* (\d+) EXISTS", until(s, b"b ")).group(1))
    s.sendall(b"c FETCH %d BODY.PEEK[]\r\n" % count)
    data = until(s, b"c ", slow=True)
    assert big in data
    s.sendall(b"d LOGOUT\r\n")
    until(s, b"d ")
    s.close()
