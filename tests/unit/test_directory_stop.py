"""Stopping the directory client on a task.Clock, with the real ClientService
and ldaptor client over in-memory transports: stop completes, once however
often it is asked, from whatever context, whatever is in flight, and logs
nothing above info. (A timed-out Active Directory test's teardown stopped it
from inside one of ClientService's own transitions: "attempting to
reentrantly run _Client.stop".)"""

from __future__ import annotations


import pytest
from ldaptor.protocols import pureldap
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from proxy.config import DirectoryConfig
from proxy.directory import Directory
from tests.unit.test_directory_pool import outcome

TIMEOUT = 5.0


class Transport(StringTransport):
    """A TCP connection in memory: a close is reported on the next turn of
    the reactor; ``polite`` closes wait for the peer, like TLS waiting for a
    stopped directory's close_notify, and only an abort ends them."""

    def __init__(self, clock, protocol, polite=False):
        super().__init__()
        self.clock, self.protocol, self.polite, self.gone = clock, protocol, polite, False

    def _gone(self):
        if not self.gone:
            self.gone = True
            self.clock.callLater(0, self.protocol.connectionLost, Failure(ConnectionDone()))

    def loseConnection(self):
        super().loseConnection()
        if not self.polite:
            self._gone()

    def abortConnection(self):
        super().loseConnection()
        self._gone()


@pytest.fixture
def logged():
    """Events logged above info while the test runs."""
    events = []

    def observe(event):
        if event.get("log_level", LogLevel.info) > LogLevel.info:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def clock():
    return MemoryReactorClock()


@pytest.fixture
def directory(clock, tmp_path):
    config = DirectoryConfig(url="ldap://127.0.0.1:389", bind_dn="cn=proxy,dc=example,dc=test",
                             bind_password_file=tmp_path / "unused",
                             user_base="ou=people,dc=example,dc=test", timeout=TIMEOUT,
                             pool_size=1, start_tls=False)
    directory = Directory(clock, config, "secret", None)
    directory.start()
    # One connection attempt per pool: search first, then bind.
    assert len(clock.tcpClients) == 2
    return directory


def accept(clock, index, polite=False):
    """The directory accepts the ``index``-th connection attempt."""
    factory = clock.tcpClients[index][2]
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 389))
    transport = Transport(clock, protocol, polite)
    protocol.makeConnection(transport)
    return protocol, transport


def refuse(clock, index):
    factory = clock.tcpClients[index][2]
    factory.clientConnectionFailed(clock.connectors[index], Failure(ConnectionRefusedError()))


def answer_bind(protocol):
    """The directory accepts the service account's bind, the one request sent."""
    (message_id,) = protocol._wrappedProtocol.onwire  # through the endpoint's wrapper
    protocol.dataReceived(
        pureldap.LDAPMessage(pureldap.LDAPBindResponse(resultCode=0), id=message_id).toWire())


def run(coroutine) -> Deferred:
    return Deferred.fromCoroutine(coroutine)


def stopped(directory) -> bool:
    return all(not c.service.running for p in (directory._search, directory._bind) for c in p._all)


def settle(clock):
    for _ in range(3):
        clock.advance(0)


def test_stop_asked_by_a_caller_that_a_failed_connection_woke(directory, clock, logged):
    """The issue: a look-up waits for a connection; the attempt fails, and
    ClientService tells the waiter from inside its transition; the caller,
    failing, stops the directory there and then (as a test's teardown does).
    The stop completes; nothing is logged as an error."""
    lookup = run(directory.resolve("alice"))
    stops = []
    lookup.addErrback(lambda failure: stops.append(run(directory.stop())))
    refuse(clock, 0)
    assert outcome(lookup) == "ok"  # its errback stopped the directory
    settle(clock)
    clock.advance(TIMEOUT)
    assert [outcome(d) for d in stops] == ["ok"]
    assert stopped(directory)
    assert [e for e in logged if e.get("log_level") >= LogLevel.error] == []


def test_stop_while_connecting_and_while_binding(directory, clock, logged):
    """Search pool: connected, its service bind unanswered; bind pool: its TCP
    attempt outstanding. Stop completes at once, quietly."""
    accept(clock, 0)
    stopping = run(directory.stop())
    settle(clock)
    assert outcome(stopping) == "ok"
    assert stopped(directory)
    assert logged == []


def test_stop_asked_twice_and_again_when_done(directory, clock, logged):
    protocol, _ = accept(clock, 0)
    answer_bind(protocol)
    first, second = run(directory.stop()), run(directory.stop())
    settle(clock)
    third = run(directory.stop())
    settle(clock)
    assert [outcome(d) for d in (first, second, third)] == ["ok"] * 3
    assert stopped(directory)
    assert logged == []


def test_stop_with_a_request_in_flight_answers_it(directory, clock, logged):
    """A look-up sent and unanswered: stop closes the connection, the look-up
    gets the temporary failure, the stop completes, nothing above info."""
    protocol, transport = accept(clock, 0)
    answer_bind(protocol)
    lookup = run(directory.resolve("alice"))
    assert not lookup.called and b"uid" in transport.value()
    stopping = run(directory.stop())
    settle(clock)
    assert outcome(stopping) == "ok"
    assert outcome(lookup) == "DirectoryUnavailable"
    assert logged == []


def test_stop_while_a_request_times_out(directory, clock, logged):
    protocol, _ = accept(clock, 0)
    answer_bind(protocol)
    lookup = run(directory.resolve("alice"))
    stopping = []
    lookup.addErrback(lambda failure: stopping.append(run(directory.stop())))
    clock.advance(TIMEOUT)  # the look-up times out; its caller stops
    settle(clock)
    clock.advance(TIMEOUT)
    assert [outcome(d) for d in stopping] == ["ok"]
    assert stopped(directory)
    assert [e for e in logged if e.get("log_level") >= LogLevel.error] == []


def test_stop_completes_when_the_directory_never_closes(directory, clock, logged):
    """A stopped (SIGSTOPped) directory over TLS never answers the close: stop
    aborts the connection after the timeout instead of waiting for ever."""
    protocol, transport = accept(clock, 0, polite=True)
    answer_bind(protocol)
    stopping = run(directory.stop())
    settle(clock)
    assert not stopping.called and transport.disconnecting
    clock.advance(TIMEOUT)
    settle(clock)
    assert outcome(stopping) == "ok"
    assert stopped(directory)
    assert logged == []


def test_a_connection_lost_during_stop(directory, clock, logged):
    protocol, transport = accept(clock, 0, polite=True)
    answer_bind(protocol)
    stopping = run(directory.stop())
    settle(clock)
    transport.abortConnection()  # the directory goes away meanwhile
    settle(clock)
    assert outcome(stopping) == "ok"
    assert logged == []
