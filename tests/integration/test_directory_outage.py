"""A directory that stalls under load (issue #22): slapd stopped with SIGSTOP
while hundreds of sign-ins wait for it, then let go. Every waiting sign-in is
answered, the daemon serves primary passwords again within seconds, an
account disabled afterwards is refused on every path, and the health check
tells the truth throughout. Against the real daemon, slapd and Dovecot."""

from __future__ import annotations

import imaplib
import os
import re
import selectors
import signal
import socket
import subprocess
import time

import pytest
from ldaptor.protocols import pureber, pureldap

from tests.conftest import wait_until
from tests.integration.conftest import PRIMARY
from tests.proxyd import ProxyDaemon, free_port, mail_backend

pytestmark = pytest.mark.integration

TIMEOUT = 2  # directory.timeout, seconds
LDAP_WAITERS = 240
IMAP_WAITERS = 20


@pytest.fixture
def daemon(slapd, dovecot, tmp_path):
    metrics = free_port()
    plain = {"tls": "none", "allow_plaintext_auth": True, "max_connections_per_source": 1000}
    daemon = ProxyDaemon(tmp_path, slapd, {
        "ldap": {"protocol": "ldap", "realm": "cloud", **plain},
        "imap": dict(mail_backend(tmp_path, dovecot, "imap"), **plain),
    }, directory=f"  timeout: {TIMEOUT}s\n  outage_grace: 1h",
        extra=f"metrics:\n  endpoint: tcp:{metrics}:interface=127.0.0.1\n")
    daemon.metrics_port = metrics
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


# -- clients -----------------------------------------------------------------------


_DECODER = pureldap.LDAPBERDecoderContext_TopLevel(
    inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
        fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext())))


def bind_request(name: str, password: str) -> bytes:
    return pureldap.LDAPMessage(pureldap.LDAPBindRequest(dn=name, auth=password.encode()),
                                id=1).toWire()


def bind_result(data: bytes) -> int | None:
    """The result code of the bind response in ``data`` (None: not whole yet)."""
    message, used = pureber.berDecodeObject(_DECODER, data)
    if message is None:
        return None
    return message.value.resultCode


def ldap_bind(daemon, name: str, password: str) -> int | None:
    with socket.create_connection(("127.0.0.1", daemon.ports["ldap"]), timeout=30) as s:
        s.sendall(bind_request(name, password))
        data = b""
        while (code := bind_result(data)) is None:
            chunk = s.recv(4096)
            if not chunk:
                return None
            data += chunk
        return code


def health(daemon, path: str) -> tuple[int, str]:
    done = subprocess.run(["curl", "-s", "-w", "\n%{http_code}",
                           f"http://127.0.0.1:{daemon.metrics_port}{path}"],
                          capture_output=True, text=True, timeout=30)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body.strip()


class Waiting:
    """Sign-ins sent together over many connections, each read until its
    answer (or the connection's end), all on one selector."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.pending: dict[socket.socket, dict] = {}
        self.answers: list = []
        self.unanswered: list = []

    def ldap(self, daemon, name: str, password: str) -> None:
        s = socket.create_connection(("127.0.0.1", daemon.ports["ldap"]), timeout=30)
        self._add(s, "ldap", bind_request(name, password))

    def imap(self, daemon, user: str, password: str) -> None:
        s = socket.create_connection(("127.0.0.1", daemon.ports["imap"]), timeout=30)
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            greeting += s.recv(4096)
        assert greeting.startswith(b"* OK"), greeting
        self._add(s, "imap", f'a1 LOGIN "{user}" "{password}"\r\n'.encode())

    def _add(self, s: socket.socket, kind: str, request: bytes) -> None:
        self.pending[s] = {"kind": kind, "request": request, "data": b""}

    def send(self) -> None:
        for s, item in self.pending.items():
            s.sendall(item["request"])
            s.setblocking(False)
            self.selector.register(s, selectors.EVENT_READ)

    def collect(self, timeout: float) -> bool:
        """Read answers until every sign-in has one or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while self.pending and (left := deadline - time.monotonic()) > 0:
            for key, _ in self.selector.select(min(left, 0.5)):
                s = key.fileobj
                item = self.pending[s]
                try:
                    chunk = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                item["data"] += chunk
                answer = self._answer(item) if chunk else None
                if answer is not None or not chunk:
                    (self.answers if answer is not None else self.unanswered).append(
                        (item["kind"], answer))
                    self.selector.unregister(s)
                    del self.pending[s]
                    s.close()
        return not self.pending

    @staticmethod
    def _answer(item: dict):
        if item["kind"] == "ldap":
            return bind_result(item["data"])
        found = re.search(rb"^a1 (OK|NO|BAD)", item["data"], re.M)
        return found.group(1).decode() if found else None

    def close(self) -> None:
        for s in list(self.pending):
            self.selector.unregister(s)
            s.close()
        self.selector.close()


# -- the stall -------------------------------------------------------------------------


def test_a_stall_under_hundreds_of_waiting_sign_ins_is_survived(daemon, slapd, unique):
    """slapd paused while 240 LDAP binds (real users' and made-up names) and
    20 IMAP logins wait on it, then let go: every one of them was answered;
    primary passwords work again within seconds; an account disabled now is
    refused, its app password included (no outage grace while the directory
    answers), and its open session is ended; the daemon is ready, and
    logged no critical line."""
    primary_uid, disabled_uid, session_uid = unique(), unique(), unique()
    primary_dn = slapd.add_user(primary_uid, PRIMARY)
    disabled_dn = slapd.add_user(disabled_uid, PRIMARY)
    session_dn = slapd.add_user(session_uid, PRIMARY)
    app_password = daemon.create_app_password(disabled_uid, "phone")
    session_password = daemon.create_app_password(session_uid, "laptop")
    # Seen active by the daemon: remembered through an outage.
    assert ldap_bind(daemon, disabled_uid, app_password) == 0
    assert ldap_bind(daemon, primary_dn, PRIMARY) == 0
    session = imaplib.IMAP4("127.0.0.1", daemon.ports["imap"], timeout=30)
    assert session.login(session_uid, session_password)[0] == "OK"

    waiting = Waiting()
    try:
        for i in range(LDAP_WAITERS):
            if i % 2:
                waiting.ldap(daemon, f"nobody-{i}", "made-up")
            else:
                waiting.ldap(daemon, primary_dn, PRIMARY)
        for i in range(IMAP_WAITERS):
            waiting.imap(daemon, disabled_uid if i % 2 else primary_uid,
                         app_password if i % 2 else PRIMARY)
        pid = slapd._process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            waiting.send()
            # Answered as the directory's timeouts run out, not when it comes back.
            all_answered = waiting.collect(timeout=10 * TIMEOUT)
            assert health(daemon, "/health/ready") == (200, "ok")  # within the outage grace
            # The outage goes on a while: long enough for the pools' new
            # connections to time out while being prepared (StartTLS, bind).
            time.sleep(3 * TIMEOUT)
        finally:
            os.kill(pid, signal.SIGCONT)
        if not all_answered:
            waiting.collect(timeout=10)
        assert not waiting.unanswered and not waiting.pending, (
            f"{len(waiting.pending)} sign-ins never answered, {len(waiting.unanswered)} "
            f"closed without an answer")
        assert all_answered, "sign-ins answered only once the directory came back"
        assert len(waiting.answers) == LDAP_WAITERS + IMAP_WAITERS
    finally:
        waiting.close()

    # Primary passwords are served again; a disabled account is refused on
    # every path, though seen active before the outage and within its grace.
    assert wait_until(lambda: ldap_bind(daemon, primary_dn, PRIMARY) == 0, 5 * TIMEOUT)
    slapd.lock(disabled_dn)
    slapd.lock(session_dn)
    assert ldap_bind(daemon, disabled_uid, app_password) == 49
    assert ldap_bind(daemon, disabled_dn, PRIMARY) == 49
    with pytest.raises(imaplib.IMAP4.error):
        imaplib.IMAP4("127.0.0.1", daemon.ports["imap"], timeout=30).login(
            disabled_uid, app_password)
    # Every primary bind, not one lucky one: the pool has all its connections.
    assert [ldap_bind(daemon, primary_dn, PRIMARY) for _ in range(20)] == [0] * 20
    # The session registry still checks accounts: the locked user's session ends.
    assert wait_until(lambda: _session_ended(session), 15), "the session outlived its account"
    assert health(daemon, "/health/ready") == (200, "ok")
    log = daemon.log()
    for bad in ("RecursionError", "Unhandled error in Deferred", "NoTransition", "#critical"):
        assert bad not in log, f"{bad} in the daemon's log:\n{log[-4000:]}"


def _session_ended(client) -> bool:
    try:
        client.noop()
    except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError):
        return True
    return False
