"""Backend connections opened ahead of logins (``backend_pool``), against a
Dovecot of this module's own, which the tests stop and start: the pool
fills after a login, lets its connections go when no login comes, and a
backend restart under a full pool costs no login."""

from __future__ import annotations

import imaplib
import os
import smtplib
import time

import pytest

from tests.integration.conftest import started_dovecot
from tests.proxyd import ProxyDaemon, mail_backend

MAX_AGE = 2.0


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    server = started_dovecot(tmp_path_factory.mktemp("dovecot-pool"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(slapd, backend, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy-pool")
    pool = {"tls": "none", "allow_plaintext_auth": True, "backend_pool": 2,
            "backend_pool_max_age": f"{MAX_AGE}s"}
    daemon = ProxyDaemon(folder, slapd, {
        "imap": dict(mail_backend(folder, backend, "imap"), **pool),
        "smtp": dict(mail_backend(folder, backend, "smtp"), **pool),
    })
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def connections_to(proxy, port: int) -> int:
    """The proxy's established TCP connections to ``port`` on loopback."""
    inodes = set()
    for fd in os.listdir(f"/proc/{proxy.process.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{proxy.process.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == port:
                count += 1
    return count


def settle(proxy, port: int, expected: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (count := connections_to(proxy, port)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def test_a_login_fills_the_pool_and_a_quiet_proxy_lets_it_go(proxy, backend, user):
    uid, _, secret = user
    assert settle(proxy, backend.imap_port, 0) == 0  # nothing before the first login
    client = imaplib.IMAP4("127.0.0.1", proxy.ports["imap"], timeout=30)
    assert client.login(uid, secret)[0] == "OK"
    # The session's own connection, and two more waiting for the next logins.
    assert settle(proxy, backend.imap_port, 3) == 3
    assert client.select("INBOX")[0] == "OK"
    client.logout()
    assert settle(proxy, backend.imap_port, 2) == 2
    # Logins in a row take prepared connections; each is replaced.
    for _ in range(5):
        client = imaplib.IMAP4("127.0.0.1", proxy.ports["imap"], timeout=30)
        assert client.login(uid, secret)[0] == "OK"
        client.logout()
    # No login for longer than the pool's age: none is kept.
    assert settle(proxy, backend.imap_port, 0, timeout=4 * MAX_AGE) == 0
    backend.wait_for_log("Disconnected")


def test_a_backend_restart_under_a_full_pool_costs_no_login(proxy, backend, user):
    uid, _, secret = user
    for _ in range(2):
        client = imaplib.IMAP4("127.0.0.1", proxy.ports["imap"], timeout=30)
        assert client.login(uid, secret)[0] == "OK"
        client.logout()
        smtp = smtplib.SMTP("127.0.0.1", proxy.ports["smtp"], timeout=30)
        smtp.login(uid, secret)
        smtp.quit()
    assert settle(proxy, backend.imap_port, 2) == 2
    backend.stop()
    backend.start()
    client = imaplib.IMAP4("127.0.0.1", proxy.ports["imap"], timeout=30)
    assert client.login(uid, secret)[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    client.logout()
    smtp = smtplib.SMTP("127.0.0.1", proxy.ports["smtp"], timeout=30)
    smtp.login(uid, secret)
    smtp.quit()
