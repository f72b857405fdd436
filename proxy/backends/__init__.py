"""Logging in to backend servers as the user, and relaying the session."""

from __future__ import annotations

import base64
import urllib.parse
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet import endpoints, error, tcp
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout
from twisted.internet.protocol import ClientFactory, Factory, Protocol

from proxy.backends.tokens import OAuthLogin, TokenUnavailable
from proxy.protocols import BACKEND_PORTS
from proxy.tls import client_options, faster_tls
from proxy.transports import hang_up, tcp_endpoint

MAX_SETUP_LINE = 65536
NOTHING: frozenset[bytes] = frozenset()


class _One(Factory):
    """A factory for one protocol instance that logs nothing per connection."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


class _Connected(ClientFactory):
    """What a connection's connector tells once connected: nothing."""

    noisy = False


_CONNECTED = _Connected()


def connect(endpoint: Any, protocol: Protocol) -> Deferred[Protocol]:
    """``connectProtocol`` without a log line for every connection. On a
    plain TCP connection, the endpoint's wrapper between the transport and
    ``protocol`` is taken out once connected: one call less for every chunk
    relayed, and about 300 bytes less for every session."""

    def connected(protocol: Protocol) -> Protocol:
        transport = protocol.transport
        wrapper = getattr(transport, "protocol", None)
        # Twisted's private wrapper, checked at start (proxy.twistedcheck).
        if isinstance(transport, tcp.Connection) and \
                isinstance(wrapper, endpoints._WrappingProtocol) and wrapper._wrappedProtocol is protocol:
            transport.protocol = protocol
            connector = getattr(transport, "connector", None)
            if connector is not None:
                connector.factory = _CONNECTED  # not the endpoint's, with its Deferred
        return protocol

    return endpoint.connect(_One(protocol)).addCallback(connected)


class BackendRefused(Exception):
    """The backend refused the proxy's login as the user."""


class TokenRefused(BackendRefused):
    """The backend refused the access token itself (expired, revoked): a
    new one is asked for, and the login tried once more with it."""


# What a backend login is expected to fail with: the backend refused it,
# could not be reached or was lost (the OS's errors, Twisted's connection
# errors, TLS), did not answer in time (a connection by host name still
# under way when the login's time is up ends as ConnectingCancelledError,
# not as the timeout), or no access token could be had for it. Anything
# else is a bug, and the front end says so with its traceback.
LOGIN_FAILURES: tuple[type[BaseException], ...] = (
    BackendRefused, OSError, error.ConnectError, error.ConnectionClosed, DeferredTimeout, SSL.Error,
    TokenUnavailable, error.ConnectingCancelledError,
)


class BackendConnection(Protocol):
    """A line-based set-up dialogue, then bytes relayed to the attached client."""

    def __init__(self, clock: Any) -> None:
        # Set by Twisted later; set now, so that every connection's
        # attributes share one dict layout (see frontends.base).
        self.connected = 0
        self.transport: Any = None
        self.clock = clock
        self._buffer = bytearray()
        self._waiting: Deferred[bytes] | None = None
        self._client: Any = None
        self.capabilities = b""
        # What the server offers (SMTP's EHLO keywords): one empty set shared
        # by all, not 216 bytes for every session.
        self.offered: frozenset[bytes] = NOTHING
        self.on_lost: Any = None  # while pooled: called when the backend closes it

    # -- set-up --------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._client is not None:
            self._client.from_backend(data)
            return
        self._buffer += data
        self._deliver()

    def _deliver(self) -> None:
        if self._waiting is None:
            if len(self._buffer) > MAX_SETUP_LINE:
                self.transport.abortConnection()
            return
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > MAX_SETUP_LINE:
                self.transport.abortConnection()
            return
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        waiting, self._waiting = self._waiting, None
        waiting.callback(line)

    def connectionLost(self, reason: Any = None) -> None:
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            # Why, when it was not a plain close: a certificate the proxy
            # refused reads as such in the log and the audit's detail.
            why = "" if reason is None or reason.check(error.ConnectionDone) \
                else f": {reason.getErrorMessage()}"
            waiting.errback(ConnectionError(f"the backend closed the connection{why}"))
        if self._client is not None:
            client, self._client = self._client, None
            client.backend_lost()

    async def line(self) -> bytes:
        end = self._buffer.find(b"\r\n")
        if end >= 0:
            # Come with the one before it (a server answers ID and LOGIN in
            # one write): no Deferred, no trip through its callbacks.
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            return line
        waiting: Deferred[bytes] = Deferred()
        self._waiting = waiting
        self._deliver()
        return await waiting

    # -- relay ---------------------------------------------------------------------

    def start_tls(self, options: Any) -> None:
        """Upgrade to TLS; anything already received in the clear is an
        injection attempt (CVE-2011-0411 class), not a reply: give up."""
        if self._buffer:
            self.transport.abortConnection()
            raise BackendRefused("the backend sent more than its STARTTLS answer")
        self.transport.startTLS(options)
        faster_tls(self.transport)

    def attach(self, client: Any) -> None:
        self._client = client
        rest, self._buffer = bytes(self._buffer), bytearray()
        if rest:
            client.from_backend(rest)

    def detach(self) -> None:
        self._client = None

    @property
    def quiet(self) -> bool:
        """Connected, and nothing unasked for has arrived (a server that
        speaks first is about to close: a timeout's or a shutdown's goodbye)."""
        return not self._buffer and self.transport is not None and self.transport.connected

    def close(self) -> None:
        self._client = None
        hang_up(self.transport, self.clock)


class _Pooled:
    """A prepared connection waiting in the pool, since when."""

    __slots__ = ("born", "connection")

    def __init__(self, born: float, connection: BackendConnection) -> None:
        self.born = born
        self.connection = connection


@attrs.define
class MasterLogin:
    """What the IMAP, POP3 and SMTP backends share: where the server is, TLS,
    the master identity it trusts, how long a login may take, and a few
    connections opened and greeted ahead of the logins that will need them.

    A login is two halves, written by each protocol: :meth:`prepare` (connect,
    the greeting, STARTTLS, what the server offers: nothing about the user)
    and :meth:`finish` (the client's address and the login as the user, in as
    few round trips as the protocol allows). Up to ``pool_size`` prepared
    connections wait for logins, each for at most ``pool_max_age`` seconds
    (less than the backend's own timeout for clients that do not log in);
    one taken is replaced at once, one that ages is replaced only while
    logins keep coming, so a quiet proxy holds none. A pooled connection the
    backend dropped meanwhile costs a retry on a new one, never the login."""

    reactor: Any
    endpoint: Any
    starttls: Any | None  # client TLS options for STARTTLS, or None
    master_user: str | None
    master_password: str = attrs.field(repr=False)
    login_style: str
    pass_client_address: bool
    timeout: float
    hostname: str = "localhost"  # the proxy's name, where a protocol says it (EHLO)
    pool_size: int = 0
    pool_max_age: float = 30.0
    goodbye: bytes = b""  # what a pooled connection says when it is let go
    # backend_login: oauth2: the user's login is SASL XOAUTH2 or OAUTHBEARER
    # with a token of the proxy's app registration, not the master user.
    oauth: OAuthLogin | None = None
    # Oldest first: each is appended as it is made ready.
    _idle: list[_Pooled] = attrs.field(factory=list, init=False)
    # One timer for the whole pool, at when its oldest connection ages: not
    # one set and cancelled for every connection, that is, every login.
    _sweep: Any = attrs.field(default=None, init=False)
    _filling: int = attrs.field(default=0, init=False)
    _last_login: float = attrs.field(default=0.0, init=False)
    _retry_at: float = attrs.field(default=0.0, init=False)
    _stopped: bool = attrs.field(default=False, init=False)

    async def ready(self) -> None:
        """Called once before the listener opens: learn what the backend offers."""

    def stop(self) -> None:
        """The listener is gone: let the pooled connections go."""
        self._stopped = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._idle:
            self._let_go(self._idle.pop().connection)

    def login(self, username: str, address: str, port: int) -> Deferred[BackendConnection]:
        """A connection logged in as ``username``, or the failure, within
        ``timeout`` seconds."""
        return Deferred.fromCoroutine(self._session(username, address, port)).addTimeout(
            self.timeout, self.reactor)

    async def _session(self, username: str, address: str, port: int) -> BackendConnection:
        if self.oauth is None:
            return await self._logged_in(username, address, port, None)
        token = await self.oauth.token()
        try:
            return await self._logged_in(username, address, port, token)
        except TokenRefused:
            # Revoked or expired early (the provider's clock ahead of
            # ours): a new token, and once more, unseen by the client.
            self.oauth.forget(token)
            fresh = await self.oauth.token()
            if fresh == token:
                raise
            return await self._logged_in(username, address, port, fresh)

    async def _logged_in(self, username: str, address: str, port: int,
                         token: str | None) -> BackendConnection:
        connection = self._take()
        if connection is not None:
            try:
                await self.finish(connection, username, address, port, token)
                return connection
            except ConnectionError:
                # The backend dropped it while it waited (its timeout, a
                # restart): a new connection, once.
                connection.transport.abortConnection()
            except BaseException:
                connection.transport.abortConnection()
                raise
        connection = await self._prepared()
        try:
            await self.finish(connection, username, address, port, token)
        except BaseException:
            connection.transport.abortConnection()
            raise
        return connection

    async def _prepared(self) -> BackendConnection:
        connection = BackendConnection(self.reactor)
        await connect(self.endpoint, connection)
        try:
            await self.prepare(connection)
        except BaseException:
            connection.transport.abortConnection()
            raise
        return connection

    async def prepare(self, connection: BackendConnection) -> None:
        """Everything before the login that is not about the user."""
        raise NotImplementedError

    async def finish(
        self, connection: BackendConnection, username: str, address: str, port: int,
        token: str | None = None,
    ) -> None:
        """The client's address, and the login as ``username`` (with
        ``token`` for backend_login: oauth2)."""
        raise NotImplementedError

    # -- the pool ------------------------------------------------------------------------

    def _take(self) -> BackendConnection | None:
        now = self.reactor.seconds()
        self._last_login = now
        taken = None
        while self._idle and taken is None:
            entry = self._idle.pop()  # the newest first
            if now - entry.born < self.pool_max_age and entry.connection.quiet:
                taken = entry.connection
                taken.on_lost = None
            else:
                self._let_go(entry.connection)
        self._fill()
        return taken

    def _fill(self) -> None:
        # Asked again each time round: a connection that fails at once (no
        # file descriptor left, no route) sets the retry time before the
        # loop goes on, and must end it.
        while (not self._stopped and self.reactor.seconds() >= self._retry_at
               and len(self._idle) + self._filling < self.pool_size):
            self._filling += 1
            Deferred.fromCoroutine(self._prepared()).addTimeout(
                self.timeout, self.reactor).addCallbacks(self._one, self._none)

    def _none(self, failure: Any) -> None:
        # Down or refusing: logins connect on their own (and say why)
        # until a while has passed.
        self._filling -= 1
        self._retry_at = self.reactor.seconds() + 5.0

    def _one(self, connection: BackendConnection) -> None:
        """A connection made ready for the pool."""
        self._filling -= 1
        if self._stopped:
            self._let_go(connection)
            return
        entry = _Pooled(self.reactor.seconds(), connection)
        self._idle.append(entry)

        def lost() -> None:
            if entry in self._idle:
                self._idle.remove(entry)

        connection.on_lost = lost
        self._arm()

    def _arm(self) -> None:
        """The sweep, when the oldest waiting connection ages (if not set)."""
        if self._sweep is None and self._idle and not self._stopped:
            wait = self._idle[0].born + self.pool_max_age - self.reactor.seconds()
            self._sweep = self.reactor.callLater(max(wait, 0.0), self._swept)

    def _swept(self) -> None:
        """Let go of the connections that have aged, replaced only while
        logins keep coming; then the sweep for the next oldest."""
        self._sweep = None
        now = self.reactor.seconds()
        aged = 0
        while self._idle and now - self._idle[0].born >= self.pool_max_age:
            self._let_go(self._idle.pop(0).connection)
            aged += 1
        if aged and now - self._last_login < self.pool_max_age:
            self._fill()
        self._arm()

    def _let_go(self, connection: BackendConnection) -> None:
        connection.on_lost = None
        if connection.transport is not None and connection.transport.connected:
            if self.goodbye:
                connection.transport.write(self.goodbye)
            connection.close()

    def plain(self, username: str) -> bytes:
        """SASL PLAIN (RFC 4616) as the master user on behalf of ``username``, base64."""
        assert self.master_user is not None
        message = b"\x00".join(
            (username.encode(), self.master_user.encode(), self.master_password.encode())
        )
        return base64.b64encode(message)


def backend_endpoint(reactor: Any, url: str, ca_pem: bytes | None, timeout: float) -> tuple[Any, Any]:
    """The endpoint for a backend URL, and the TLS options for its host (used
    for implicit TLS here, or by the caller for STARTTLS)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or BACKEND_PORTS[parts.scheme]
    options = client_options(host, ca_pem)
    endpoint = tcp_endpoint(reactor, host, port, timeout)
    if parts.scheme.endswith("s"):
        endpoint = endpoints.wrapClientTLS(options, endpoint)
    return endpoint, options
