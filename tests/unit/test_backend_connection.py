"""A backend connection's set-up dialogue, line by line, in memory."""

from __future__ import annotations

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from proxy.backends import BackendConnection, BackendRefused


def connection() -> BackendConnection:
    backend = BackendConnection(Clock())
    backend.makeConnection(StringTransport())
    return backend


def test_lines_come_in_order_whether_they_arrive_together_or_apart():
    backend = connection()
    backend.dataReceived(b"* ID NIL\r\nlap1 OK ID done\r\nlap3 O")
    # Already here: read at once.
    assert ensureDeferred(backend.line()).result == b"* ID NIL"
    assert ensureDeferred(backend.line()).result == b"lap1 OK ID done"
    waiting = ensureDeferred(backend.line())
    assert not waiting.called  # half a line: it waits for the rest
    backend.dataReceived(b"K Logged in\r\n")
    assert waiting.result == b"lap3 OK Logged in"


def test_a_line_waited_for_fails_when_the_backend_closes():
    backend = connection()
    waiting = ensureDeferred(backend.line())
    backend.connectionLost(None)
    failures = []
    waiting.addErrback(failures.append)
    assert failures[0].check(ConnectionError)


def test_why_the_backend_was_lost_is_said_unless_it_simply_closed():
    from OpenSSL import SSL
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    said = []
    for reason in (Failure(ConnectionDone()),
                   Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))):
        backend = connection()
        waiting = ensureDeferred(backend.line())
        backend.connectionLost(reason)
        waiting.addErrback(lambda f: said.append(str(f.value)))
    assert said[0] == "the backend closed the connection"
    assert "certificate verify failed" in said[1]


def test_bytes_after_the_starttls_answer_are_refused_as_an_injection():
    backend = connection()
    backend.dataReceived(b"lap0 OK Begin TLS\r\n* OK injected\r\n")
    assert ensureDeferred(backend.line()).result == b"lap0 OK Begin TLS"
    with pytest.raises(BackendRefused):
        backend.start_tls(object())
    assert backend.transport.disconnecting  # closed, not read on
