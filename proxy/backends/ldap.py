"""A session's own connection to the upstream directory.

After a client's bind is accepted, its session gets a connection of its own
to the directory: upgraded with StartTLS if the directory is configured so,
bound as the user (primary password) or as the service account (app
password), then relayed message by message. Messages are framed (header
only, never decoded) so that the proxy can write its own at message
boundaries, such as a notice of disconnection.
"""

from __future__ import annotations

import re

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from proxy.backends import connect
from proxy.config import DirectoryConfig
from proxy.moves import Moves, Phases
from proxy.wire import ber
from proxy.transports import hang_up, write_now
from proxy.wire.dn import normalise_dn

log = Logger(namespace="legacy_auth_proxy.backends.ldap")

# Messages from the directory may be large (an entry with many values); the
# limit only guards against a broken peer.
MAX_UPSTREAM_MESSAGE = 64 * 1024 * 1024
# The message id of the proxy's own requests on a session's connection: the
# largest there is, so that it never meets a client's (RFC 4511 4.1.1.1).
OWN_ID = 2**31 - 1


class UpstreamRefused(Exception):
    """The directory refused the session's bind."""


class UpstreamLDAP(Protocol):
    """Answers to the proxy's own requests (id ``OWN_ID``) go to the waiting
    request; everything else to ``on_frame``."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._framer = ber.Framer(MAX_UPSTREAM_MESSAGE, max_depth=64)
        self._waiting: Deferred[bytes] | None = None
        self.on_frame: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.bound_as: str | None = None  # None: anonymous
        self.closed = False
        self.lost = Deferred()

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._framer.feed(data)
        except ber.BERError as e:
            log.warn("the directory sent a malformed message: {error}", error=str(e))
            self.transport.abortConnection()
            return
        for frame in frames:
            try:
                id = ber.parse_message(frame).id
            except ber.BERError:
                self.transport.abortConnection()
                return
            if id == OWN_ID and self._waiting is not None:
                waiting, self._waiting = self._waiting, None
                waiting.callback(frame)
            elif self.on_frame is not None:
                self.on_frame(frame)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(ConnectionError("the directory closed the connection"))
        if self.on_lost is not None:
            self.on_lost()
        self.lost.callback(None)

    async def request(self, frame: bytes) -> ber.Message:
        """Send one of the proxy's own requests (id ``OWN_ID``); its answer."""
        waiting: Deferred[bytes] = Deferred()
        self._waiting = waiting
        write_now(self.transport, frame)
        return ber.parse_message(await waiting)

    async def bind(self, dn: str | None, password: str, reactor: Any, timeout: float) -> None:
        """Bind as ``dn`` (None: anonymous) on this connection. Raises
        UpstreamRefused if the directory says no."""
        answer = self.request(ber.bind_request(OWN_ID, dn or "", password))
        response = await Deferred.fromCoroutine(answer).addTimeout(timeout, reactor)
        code = ber.parse_result_code(response)
        if code != ber.SUCCESS:
            self.bound_as = None
            raise UpstreamRefused(f"the directory answered the bind with {code}")
        self.bound_as = dn

    def send(self, frame: bytes) -> None:
        write_now(self.transport, frame)

    def close(self) -> None:
        self.closed = True
        hang_up(self.transport, self.clock)


async def open_upstream(
    reactor: Any,
    endpoint: Any,
    start_tls: Any | None,
    bind_dn: str | None,
    password: str,
    timeout: float,
) -> UpstreamLDAP:
    """Connect, upgrade and bind; an UpstreamLDAP ready to relay. Raises
    UpstreamRefused if the bind is refused, other errors if the directory
    cannot be reached in ``timeout`` seconds."""
    protocol = UpstreamLDAP(reactor)
    connected = connect(endpoint, protocol)
    connected.addTimeout(timeout, reactor)
    await connected
    try:
        if start_tls is not None:
            answer = protocol.request(ber.extended_request(OWN_ID, ber.START_TLS))
            response = await Deferred.fromCoroutine(answer).addTimeout(timeout, reactor)
            if ber.parse_result_code(response) != ber.SUCCESS:
                raise ConnectionError("the directory refused StartTLS")
            protocol.transport.startTLS(start_tls)
        if bind_dn is not None:
            await protocol.bind(bind_dn, password, reactor, timeout)
    except BaseException:
        protocol.transport.abortConnection()
        raise
    return protocol


# refuse(code, text, fatal): what to tell the client about a request that
# could not be relayed.
Refuse = Callable[[int, str, bool], None]


class Binding(Phases):
    """Who binds a session's directory connection, and whether a bind is
    under way (:data:`BINDINGS` says how it gets on)."""

    # The proxy binds it itself when a request needs it: as the reading
    # account (an app password's session) or anonymously.
    LAZY = "lazy"
    # The proxy is binding it for the requests that wait, in order.
    PREPARING = "preparing"
    # Bound with the user's own password, once, at the bind: the proxy keeps
    # no password to bind again, so if it is lost the session ends.
    PINNED = "pinned"
    CLOSED = "closed"  # the client's connection is gone


BINDINGS: Moves[Binding] = Moves("directory session", {
    Binding.LAZY: {"want_lazy": Binding.LAZY, "want_pinned": Binding.PINNED,
                   "prepare": Binding.PREPARING, "prepared": Binding.LAZY,
                   "end": Binding.CLOSED},
    Binding.PREPARING: {"want_lazy": Binding.PREPARING, "want_pinned": Binding.PINNED,
                        "prepared": Binding.LAZY, "end": Binding.CLOSED},
    # A bind the proxy began before the user's own was made ends here.
    Binding.PINNED: {"want_lazy": Binding.LAZY, "want_pinned": Binding.PINNED,
                     "prepared": Binding.PINNED, "end": Binding.CLOSED},
    Binding.CLOSED: {"want_lazy": Binding.CLOSED, "want_pinned": Binding.CLOSED,
                     "prepared": Binding.CLOSED, "end": Binding.CLOSED},
})


class DirectorySession:
    """A client session's own connection to the directory, bound as the
    session needs it: opened when first needed, re-bound (never reopened)
    when the identity changes, one bind at a time, so that a bind never
    races a lazy connect. Its phase is one :class:`Binding`, moved only as
    :data:`BINDINGS` allows."""

    def __init__(self, *, opener: Any, clock: Any, timeout: float,
                 on_frame: Callable[[bytes], None], on_lost: Callable[[], None],
                 on_connected: Callable[[UpstreamLDAP], None]) -> None:
        self._opener = opener  # open(dn, password) -> UpstreamLDAP
        self._clock = clock
        self._timeout = timeout
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._on_connected = on_connected
        self.upstream: UpstreamLDAP | None = None
        self.wanted: str | None = None  # whom the directory must see the session as
        self._password = ""  # the reading account's, for lazy binds
        self.phase = Binding.LAZY
        self._lock = DeferredLock()
        # Requests waiting for a lazy bind: (as whom, frame, refuse).
        self._pending: list[tuple[str | None, bytes, Refuse]] = []

    def _move(self, event: str) -> None:
        self.phase = BINDINGS.after(self.phase, event)

    @property
    def closed(self) -> bool:
        return self.phase is Binding.CLOSED

    @property
    def busy(self) -> bool:
        """Requests are waiting for the connection to be (re)bound."""
        return self.phase is Binding.PREPARING

    def want(self, dn: str | None, password: str, lazy: bool) -> None:
        """Requests go to the directory as ``dn`` (None: anonymous) from now
        on. ``lazy``: the proxy may bind as ``dn`` itself, with ``password``
        (the reading account's); else the connection was bound with the
        user's own password (:meth:`bind_as`) and is never re-bound."""
        self.wanted, self._password = dn, password
        self._move("want_lazy" if lazy else "want_pinned")

    async def bind_as(self, dn: str | None, password: str) -> None:
        """A connection bound as ``dn``: the one the session has, re-bound if
        need be, or a new one. Raises UpstreamRefused or a connection error."""
        await self._lock.acquire()
        try:
            upstream = self.upstream
            if upstream is not None and not upstream.closed:
                if upstream.bound_as != dn:
                    try:
                        await upstream.bind(dn, password, self._clock, self._timeout)
                    except UpstreamRefused:
                        raise
                    except BaseException:
                        # Timed out or lost: the directory may still finish
                        # that bind, so the connection's identity is unknown.
                        self.close()
                        raise
                return
            upstream = await self._opener(dn, password)
            upstream.bound_as = dn
            if self.closed or self.upstream is not None:
                upstream.close()
                return
            self.upstream = upstream
            upstream.on_frame = self._on_frame
            upstream.on_lost = self._lost
            self._on_connected(upstream)
        finally:
            self._lock.release()

    def _ready(self) -> UpstreamLDAP | None:
        """The connection, if it is open and bound as wanted."""
        upstream = self.upstream
        if upstream is not None and not upstream.closed and upstream.bound_as == self.wanted:
            return upstream
        return None

    def send(self, frame: bytes, refuse: Refuse) -> None:
        """Relay ``frame`` as the wanted identity, now or once the connection
        is bound so; else ``refuse(code, text, fatal)``: fatal when the
        session cannot go on without the connection it lost."""
        phase = self.phase
        upstream = self._ready()
        if upstream is not None and phase is not Binding.PREPARING:  # else after those waiting
            upstream.send(frame)
        elif phase is Binding.PINNED:
            refuse(ber.UNAVAILABLE, "the directory closed the connection", True)
        elif phase is Binding.CLOSED:
            refuse(ber.UNAVAILABLE, "the directory cannot be reached", False)
        else:
            self._pending.append((self.wanted, frame, refuse))
            if phase is Binding.LAZY:
                self._move("prepare")
                Deferred.fromCoroutine(self._prepare()).addErrback(
                    lambda f: log.failure("preparing the directory connection failed", f))

    async def _prepare(self) -> None:
        """Bind as the wanted identity, then send what waited for it; again
        if the identity changed meanwhile and new requests wait for it."""
        while self.phase is Binding.PREPARING:
            wanted = self.wanted
            try:
                await self.bind_as(wanted, self._password if wanted is not None else "")
            except Exception as e:
                log.warn("cannot reach the directory: {error}", error=str(e) or type(e).__name__)
                pending, self._pending = self._pending, []
                self._move("prepared")
                for _, _, refuse in pending:
                    refuse(ber.UNAVAILABLE, "the directory cannot be reached", False)
                return
            if self.phase is Binding.PREPARING and self.wanted != wanted and any(
                    who == self.wanted for who, _, _ in self._pending):
                # Requests of a later identity wait: bind again for them
                # (those of the earlier one are refused below, in turn).
                continue
            break
        pending, self._pending = self._pending, []
        self._move("prepared")
        upstream = self._ready()
        for who, frame, refuse in pending:
            if upstream is not None and who == self.wanted and not upstream.closed:
                upstream.send(frame)
            else:
                refuse(ber.OPERATIONS_ERROR, "a successful bind is needed first", False)

    def abandon(self, frame: bytes) -> None:
        if self.upstream is not None and not self.upstream.closed:
            self.upstream.send(frame)

    def _lost(self) -> None:
        self.upstream = None
        self._on_lost()

    def close(self) -> None:
        """Drop the connection (the session goes on without one)."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.on_frame = None
            upstream.on_lost = None
            upstream.close()

    def end(self) -> None:
        """The client's connection is gone: drop the directory's, and open
        no other."""
        self._move("end")
        self.close()


_WORDLESS = re.compile(r"\W+")


@attrs.define
class Upstream:
    """How sessions reach the directory."""

    reactor: Any
    config: DirectoryConfig
    endpoint: Any
    start_tls: Any | None  # client TLS options when StartTLS is wanted
    service_password: str = attrs.field(repr=False)
    search_password: str = attrs.field(default="", repr=False)
    # The accounts whose own entries app-password sessions never see.
    hidden: frozenset[str] = attrs.field(init=False)
    # A cheap first look before a DN is parsed: the word characters of each
    # hidden DN's first value (``cn=LDAP Proxy,...`` → ``ldapproxy``).
    _hints: frozenset[str] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.hidden = frozenset(
            normalise_dn(dn) for dn in (self.config.bind_dn, self.config.search_bind_dn) if dn
        )
        self._hints = frozenset(_WORDLESS.sub("", h.split(",", 1)[0].split("=", 1)[-1])
                                for h in self.hidden)

    def password_of(self, dn: str | None) -> str:
        """The password of an account the proxy binds as for app-password
        sessions (the core says which)."""
        if dn == self.config.bind_dn:
            return self.service_password
        if dn is not None and dn == self.config.search_bind_dn:
            return self.search_password
        return ""

    def reads_for_others(self, dn: str | None) -> bool:
        """Whether a connection bound as ``dn`` reads for app-password
        sessions (the service or search account), whose answers are filtered."""
        return dn is not None and normalise_dn(dn) in self.hidden

    def is_hidden(self, name: bytes) -> bool:
        """Whether an entry the directory returned is a reading account's
        own, however its DN is written (case, spaces, escapes: Active
        Directory's ``CN=LDAP Proxy,OU=Service Accounts,...`` included)."""
        text = name.decode("utf-8", "replace").lower()
        if "\\" not in text:
            squeezed = _WORDLESS.sub("", text)
            if not any(hint in squeezed for hint in self._hints):
                return False
        return normalise_dn(text) in self.hidden

    async def open(self, dn: str | None, password: str) -> UpstreamLDAP:
        return await open_upstream(
            self.reactor, self.endpoint, self.start_tls, dn, password, self.config.timeout
        )
