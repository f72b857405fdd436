"""The backend pool on a clock: connections made ready ahead of logins,
each let go when it ages unless a login takes it first, with one timer for
the whole pool. The same against a real Dovecot is in
tests/integration/test_backend_pool.py."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectBindError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from proxy.backends import BackendConnection, MasterLogin

AGE = 30.0


class Endpoint:
    """Connects at once, to a transport that records what is written."""

    def __init__(self) -> None:
        self.transports: list[StringTransport] = []

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        self.transports.append(transport)
        protocol.makeConnection(transport)
        return succeed(protocol)


@attrs.define
class Ready(MasterLogin):
    """Nothing to say before a login, nor for it."""

    async def prepare(self, connection: BackendConnection) -> None:
        pass

    async def finish(self, connection: BackendConnection, username: str, address: str,
                     port: int, token: str | None = None) -> None:
        pass


def pool(size: int = 2) -> tuple[Ready, Clock, Endpoint]:
    clock, endpoint = Clock(), Endpoint()
    backend = Ready(reactor=clock, endpoint=endpoint, starttls=None, master_user="proxy",
                    master_password="secret", login_style="sasl", pass_client_address=False,
                    timeout=10.0, pool_size=size, pool_max_age=AGE, goodbye=b"bye\r\n")
    return backend, clock, endpoint


def waiting(backend: Ready) -> list[BackendConnection]:
    return [entry.connection for entry in backend._idle]


def sweeps(clock: Clock) -> int:
    """The pool's timers (not the deadlines of connections let go)."""
    return sum(1 for call in clock.getDelayedCalls() if call.func.__name__ == "_swept")


def let_go(endpoint: Endpoint) -> int:
    return sum(1 for t in endpoint.transports if t.value() == b"bye\r\n")


def test_a_login_fills_the_pool_and_each_waiting_connection_is_let_go_as_it_ages():
    backend, clock, endpoint = pool()
    assert backend._take() is None and len(waiting(backend)) == 2
    assert len(clock.getDelayedCalls()) == sweeps(clock) == 1  # for the pool, not one each
    clock.advance(AGE - 1)
    assert let_go(endpoint) == 0
    clock.advance(1)
    # Both aged together, and no login came meanwhile: none is made again.
    assert let_go(endpoint) == 2 and waiting(backend) == []
    assert sweeps(clock) == 0


def test_a_login_takes_the_newest_and_the_sweep_follows_the_oldest():
    backend, clock, endpoint = pool()
    backend._take()  # two made ready at 0
    clock.advance(10)
    newest = waiting(backend)[-1]
    assert backend._take() is newest  # and one made ready at 10 in its place
    born = [entry.born for entry in backend._idle]
    assert born == [0.0, 10.0]
    clock.advance(AGE - 10)
    # The one of 0 aged; a login came within the age, so it is replaced.
    assert let_go(endpoint) == 1
    assert [entry.born for entry in backend._idle] == [10.0, AGE]
    clock.advance(10)
    assert let_go(endpoint) == 2  # the one of 10; no login since 10, so not replaced
    assert [entry.born for entry in backend._idle] == [AGE]
    clock.advance(AGE)
    assert let_go(endpoint) == 3 and waiting(backend) == []
    assert sweeps(clock) == 0


def test_a_connection_the_backend_drops_leaves_the_pool_and_stop_lets_go_of_the_rest():
    backend, clock, endpoint = pool()
    backend._take()
    dropped = waiting(backend)[0]
    dropped.connectionLost(None)
    assert dropped not in waiting(backend) and len(waiting(backend)) == 1
    backend.stop()
    assert waiting(backend) == [] and sweeps(clock) == 0
    assert let_go(endpoint) == 1


class Failing(Endpoint):
    """Fails at once, as connecting with no file descriptor left does; past
    a few tries, never answers (so that a fill that would try for ever ends)."""

    def connect(self, factory: Any) -> Any:
        self.transports.append(StringTransport())
        if len(self.transports) > 10:
            return Deferred()
        return fail(ConnectBindError(24, "Too many open files"))


def test_a_connection_that_fails_at_once_stops_the_fill_until_a_while_has_passed():
    backend, clock, _ = pool()
    backend.endpoint = endpoint = Failing()
    assert backend._take() is None
    assert len(endpoint.transports) == 1  # tried once, not again and again in one turn
    clock.advance(1)
    backend._take()
    assert len(endpoint.transports) == 1  # within the retry's wait
    clock.advance(5)
    backend._take()
    assert len(endpoint.transports) == 2


def test_a_submission_server_that_never_speaks_cannot_hold_the_start():
    """The extensions are read within the backend's timeout, or the
    defaults are offered: the daemon's start (and a reload) waits for it."""
    from proxy.backends.smtp import SMTPBackend
    from proxy.wire.smtp import DEFAULT_EXTENSIONS

    clock, endpoint = Clock(), Endpoint()
    backend = SMTPBackend(reactor=clock, endpoint=endpoint, starttls=None, master_user="proxy",
                          master_password="secret", login_style="sasl",
                          pass_client_address=False, timeout=10.0)
    ready = Deferred.fromCoroutine(backend.ready())
    clock.advance(10)
    assert ready.called
    assert backend.extensions == list(DEFAULT_EXTENSIONS)
    assert endpoint.transports[0].disconnecting


def test_a_login_out_of_time_while_connecting_by_host_name_is_a_login_failure():
    """Twisted's HostnameEndpoint, cancelled by the login's timeout while it
    connects, fails with ConnectingCancelledError: the backend could not be
    reached in time, audited as such, not a bug."""
    from twisted.internet import endpoints
    from twisted.internet.address import IPv4Address
    from twisted.internet.interfaces import IHostnameResolver, IReactorPluggableNameResolver
    from twisted.internet.testing import MemoryReactorClock
    from zope.interface import implementer

    from proxy.backends import LOGIN_FAILURES

    @implementer(IHostnameResolver)
    class Resolver:
        def resolveHostName(self, receiver: Any, name: str, port: int = 0, *args: Any,
                            **kwargs: Any) -> Any:
            receiver.resolutionBegan(None)
            receiver.addressResolved(IPv4Address("TCP", "192.0.2.1", port))
            receiver.resolutionComplete()
            return receiver

    @implementer(IReactorPluggableNameResolver)
    class Reactor(MemoryReactorClock):
        nameResolver = Resolver()

    reactor = Reactor()
    backend = Ready(reactor=reactor, endpoint=endpoints.HostnameEndpoint(
                        reactor, "imap.example", 143, timeout=30.0),
                    starttls=None, master_user="proxy", master_password="secret",
                    login_style="sasl", pass_client_address=False, timeout=10.0)
    failures: list[Any] = []
    backend.login("alice", "198.51.100.7", 5555).addErrback(failures.append)
    reactor.advance(10)
    assert failures and isinstance(failures[0].value, LOGIN_FAILURES)
