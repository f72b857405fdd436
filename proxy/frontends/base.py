"""What the IMAP and SMTP front ends share: a pre-login dialogue run by a
state machine, then a login decided by the core, then a relayed session.

Each front end supplies its machine (bytes in, events out) and the words of
its protocol (greeting, success, goodbye); this module does the rest: TLS,
limits per source, timers, the Authenticator, the backend login, flow
controlled relaying both ways, and ending sessions whose credentials are
revoked.
"""

from __future__ import annotations

from typing import Any, Protocol as TypingProtocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from proxy import splice
from proxy.backends import LOGIN_FAILURES, BackendRefused
from proxy.backends.tokens import TokenUnavailable
from proxy.auth import Attempt, Decision, Outcome, Reason
from proxy.config import LimitsConfig, ListenerConfig
from proxy.moves import IllegalMove, Moves, Phases  # noqa: F401 (the front ends take them from here)
from proxy.tls import faster_tls
from proxy.transports import AFTER_GOODBYE, hang_up, write_now
from proxy.wire import sasl
from proxy.wire.lines import LineReader, TooLong

log = Logger(namespace="legacy_auth_proxy.frontends")

# Reads of a relayed session (in Python: TLS on either side, submission):
# large, for fewer trips through Python, but under glibc's mmap threshold
# (proxy.runner.MMAP_THRESHOLD), for a buffer of 128 KiB or more is a fresh
# mapping (page faults, then munmap) on every read: 256 KiB reads relayed
# TLS at 400 MB/s here, 120 KiB reads at 600-670 MB/s.
RELAY_READ_SIZE = 120 * 1024


class Connection(Phases):
    """A client connection's phase on its listener, where the dialogue keeps
    its own (LDAP: :class:`proxy.frontends.ldap.LDAPSession`)."""

    NEW = "new"  # built, not yet connected
    OPEN = "open"
    CLOSING = "closing"  # hung up: the goodbye, then TLS's close, then the socket
    GONE = "gone"  # the connection is lost


CONNECTION_MOVES: Moves[Connection] = Moves("connection", {
    Connection.NEW: {"connect": Connection.OPEN, "hang_up": Connection.CLOSING,
                     "lost": Connection.GONE},
    Connection.OPEN: {"hang_up": Connection.CLOSING, "lost": Connection.GONE},
    Connection.CLOSING: {"hang_up": Connection.CLOSING, "lost": Connection.GONE},
    Connection.GONE: {"hang_up": Connection.GONE},
})


@implementer(IPushProducer)
class ReadControl:
    """When to read from a client: not while its answers pile up unread (the
    transport calls pause and resume, as for any producer), and not while a
    decision about it is pending. Either reason stops reading; reading goes
    on when neither holds. Before login, this keeps what one client can make
    the proxy buffer to about one read."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.reasons: set[str] = set()
        self.paused = False

    def _update(self) -> None:
        if self.transport is None or bool(self.reasons) == self.paused:
            return
        self.paused = bool(self.reasons)
        if self.paused:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    def hold(self, reason: str) -> None:
        self.reasons.add(reason)
        self._update()

    def release(self, reason: str) -> None:
        self.reasons.discard(reason)
        self._update()

    def pauseProducing(self) -> None:
        self.hold("output")

    def resumeProducing(self) -> None:
        self.release("output")

    def stopProducing(self) -> None:
        self.transport = None


class PerSource:
    """Connections held by each client address on one listener."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def admit(self, address: str) -> bool:
        count = self.counts.get(address, 0)
        if count >= self.limit:
            return False
        self.counts[address] = count + 1
        return True

    def leave(self, address: str) -> None:
        left = self.counts[address] - 1
        if left:
            self.counts[address] = left
        else:
            del self.counts[address]


class PreLoginBudget:
    """What the whole daemon holds, over every listener, for clients that
    have not signed in: connections, and bytes of their unfinished commands
    and messages. Limits per source alone do not bound it: a thousand
    sources each holding an unfinished message would. A connection past
    either limit is refused, or closed, at once; one that signs in leaves
    the budget."""

    def __init__(self, max_connections: int, max_bytes: int, max_total: int = 1 << 30) -> None:
        self.max_connections = max_connections
        self.max_bytes = max_bytes
        self.max_total = max_total
        self.total = 0  # every client connection, signed in or not
        self.connections = 0
        self.bytes = 0
        self._held: dict[Any, int] = {}

    def admit(self, connection: Any, force: bool = False) -> bool:
        """Count a connection not signed in; False past the limit, unless
        ``force`` (a session that was signed in keeps its place)."""
        if self.connections >= self.max_connections and not force:
            return False
        self.connections += 1
        self._held[connection] = 0
        return True

    def hold(self, connection: Any, size: int) -> bool:
        """``connection`` now holds ``size`` bytes; False if that takes the
        daemon past its budget (the caller closes it)."""
        held = self._held.get(connection)
        if held is None:
            return True  # signed in: no longer counted
        self.bytes += size - held
        self._held[connection] = size
        # Only a connection that grows is closed: the others did not spend it.
        return size <= held or self.bytes <= self.max_bytes

    def leave(self, connection: Any) -> None:
        """Signed in, or gone."""
        held = self._held.pop(connection, None)
        if held is not None:
            self.connections -= 1
            self.bytes -= held


def client_address(transport: Any) -> tuple[str, int]:
    peer = transport.getPeer()
    return getattr(peer, "host", None) or "unix", getattr(peer, "port", 0) or 0


class ListenerConnection:
    """A client connection's place on its listener: counted per source,
    refused past the limit, and its idle timer. Shared by every front end."""

    listener: Any
    transport: Any
    address = "unknown"
    port = 0
    _counted = False
    # The phase and its table; a subclass with more phases names its own.
    MOVES: Moves[Any] = CONNECTION_MOVES
    ENDED: frozenset[Any] = frozenset({Connection.CLOSING, Connection.GONE})
    phase: Any = Connection.NEW
    # Hung up, or gone: nothing more is read or answered. Kept by _move
    # beside the phase, as it is asked several times for every request.
    _closing = False
    _timer: Any = None
    _deadline: Any = None
    reading: ReadControl | None = None

    def _attributes(self) -> None:
        """Every attribute a connection gets later (from Twisted, at login,
        with traffic), set now, in one order for all: Python then keeps
        each connection's attributes in a dict that shares its keys with the
        others'. One set in another order makes it a dict of its own, about
        1.5 KiB more for every session (measured with tracemalloc)."""
        self.factory = None
        self.connected = 0
        self.transport = None
        self.address = "unknown"
        self.port = 0
        self._counted = False
        self.phase = self.phase  # the class's first phase, in this instance's dict
        self._closing = self.phase in self.ENDED
        self._timer = None
        self.reading = None
        self.username = ""
        self.dn = ""
        self.app_password_id = None
        self.app_password_created_at = None
        self.password_changed_at = None
        self._touched = 0.0
        self._deadline = None
        self._after_goodbye = 0

    def _move(self, event: str) -> None:
        """Tell the connection's phase of ``event`` (IllegalMove if its
        table has no such move)."""
        phase = self.phase = self.MOVES.after(self.phase, event)
        self._closing = phase in self.ENDED

    def _enter(self, refusal: bytes) -> bool:
        """Count this connection; False (and the client told ``refusal``) past
        the limit of its source, or of all connections not signed in."""
        self.address, self.port = client_address(self.transport)
        if not self.listener.per_source.admit(self.address):
            self.transport.write(refusal)
            self._hang_up()
            return False
        budget = self.listener.budget
        if budget.total >= budget.max_total or not budget.admit(self):
            self.listener.per_source.leave(self.address)
            log.warn("{address}: refused: {total} connections, {count} not signed in yet",
                     address=self.address, total=budget.total, count=budget.connections)
            self.transport.write(refusal)
            self._hang_up()
            return False
        budget.total += 1
        self._counted = True
        self.listener.connections.add(self)
        return True

    def _within_budget(self, buffered: int) -> bool:
        """Account for what this connection holds before sign-in; False if
        the daemon's budget is spent (the caller closes the connection)."""
        if self.listener.budget.hold(self, buffered):
            return True
        log.warn("{address}: closed: clients not signed in hold more than {limit} bytes",
                 address=self.address, limit=self.listener.budget.max_bytes)
        return False

    # for the session registry
    username = ""
    dn = ""
    app_password_id: str | None = None
    app_password_created_at: float | None = None
    password_changed_at: float | None = None

    _touched = 0.0
    _after_goodbye = 0

    def _dropped(self, data: bytes) -> None:
        """Bytes that came after the goodbye: dropped unread, and past
        :data:`proxy.transports.AFTER_GOODBYE` not read at all."""
        self._after_goodbye += len(data)
        if self._after_goodbye > AFTER_GOODBYE and self.transport is not None:
            self.transport.pauseProducing()

    def _past_login(self) -> bool:
        """Whether the idle timeout applies (not the login deadline)."""
        raise NotImplementedError

    def _touch(self) -> None:
        """Traffic: the idle timer starts over. Before login the timer is a
        deadline from connect (as Dovecot's and Postfix's are): a client
        trickling bytes does not move it."""
        if not self._past_login():
            return
        # Resetting a timer is not free; relaying calls this for every chunk,
        # and a second's precision is plenty for an idle timeout.
        now = self.listener.reactor.seconds()
        if now - self._touched < 1.0:
            return
        self._touched = now
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.config.idle_timeout)

    def _signed_in(self, decision: Decision) -> None:
        """The client signed in: a session the registry can end, out of the
        budget of connections not signed in."""
        assert decision.account is not None
        self.username = decision.username
        self.dn = decision.account.dn
        ap = decision.app_password
        self.app_password_id = ap.id if ap else None
        self.app_password_created_at = ap.created_at if ap else None
        self.password_changed_at = decision.account.password_changed_at
        self.listener.sessions.add(self)
        self.listener.budget.leave(self)

    def shut_down(self) -> None:
        """The daemon stops: say goodbye in the protocol's way, and close."""
        raise NotImplementedError

    def _hang_up(self) -> None:
        """Close the client connection, whatever is registered on it: every
        path that ends a session ends here (see :mod:`proxy.transports`)."""
        self._move("hang_up")
        self.reading = None
        self.listener.budget.hold(self, 0)  # what it held is not kept for it
        if self._deadline is None:
            self._deadline = hang_up(self.transport, self.listener.reactor)

    def _leave(self) -> None:
        self._move("lost")
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._deadline is not None:
            self._deadline.cancel()
        if self._counted:
            self.listener.per_source.leave(self.address)
            self.listener.budget.leave(self)
            self.listener.budget.total -= 1
            self._counted = False
        self.listener.connections.discard(self)


@attrs.frozen
class Send:
    data: bytes


@attrs.frozen
class StartTLS:
    """The go-ahead has been sent: start TLS now, before reading anything else."""


@attrs.frozen
class Login:
    tag: bytes  # IMAP's command tag; empty for SMTP and POP3
    username: str
    secret: str = attrs.field(repr=False)
    mechanism: str
    authzid: str = ""  # SASL's authorization identity, if the client sent one


def login_event(tag: bytes, credentials: sasl.Credentials) -> Login:
    """The login to decide, from what the client sent. The secret's bytes
    reach the directory unchanged, even if not UTF-8."""
    return Login(
        tag,
        credentials.authcid.decode("utf-8", "replace"),
        credentials.secret.decode("utf-8", "surrogateescape"),
        credentials.mechanism,
        credentials.authzid.decode("utf-8", "replace"),
    )


@attrs.frozen
class Close:
    pass


Event = Send | StartTLS | Login | Close


@attrs.frozen
class ToBackend:
    """After login: bytes for the backend."""

    data: bytes


@attrs.frozen
class ToClient:
    """After login: bytes for the client."""

    data: bytes


class Guard(TypingProtocol):
    """What stands in the relay after login, where a protocol needs it."""

    waiting: int

    def feed_client(self, data: bytes) -> list[ToBackend | ToClient]: ...

    def feed_backend(self, data: bytes) -> list[ToBackend | ToClient]: ...


class Dialogue:
    """What every dialogue before login keeps: whether TLS is up or on
    offer, whether a login may be offered in the clear, the count of bad
    commands, and a reader of the client's bytes."""

    closed = False
    deciding = False

    def __init__(self, *, tls: bool, starttls: bool, allow_plaintext: bool, max_bad: int,
                 reader: Any, bearer: bool = False) -> None:
        self.tls = tls
        # The SASL mechanisms offered: PLAIN and LOGIN, and XOAUTH2 and
        # OAUTHBEARER where the core takes access tokens (it says so).
        self.mechanisms = sasl.MECHANISMS + (sasl.BEARER_MECHANISMS if bearer else ())
        self.starttls = starttls
        self.allow_plaintext = allow_plaintext
        self.max_bad = max_bad
        self.bad = 0
        self.reader = reader

    @property
    def can_login(self) -> bool:
        """Whether a login is offered (what it is decided by is the core's)."""
        return self.tls or self.allow_plaintext

    def _one_more_bad(self) -> bool:
        """Count a bad command; True when it is one too many."""
        self.bad += 1
        return self.bad >= self.max_bad

    def _close(self, line: bytes) -> list[Event]:
        """Say ``line`` and close."""
        self.closed = True
        return [Send(line + b"\r\n"), Close()]

    @property
    def buffered(self) -> int:
        return self.reader.buffered

    def take_rest(self) -> bytes:
        """After a successful login: the bytes pipelined behind it."""
        self.closed = True
        return self.reader.take_rest()


class LineDialogue(Dialogue):
    """What the line-based dialogues before login (SMTP, POP3) share: CRLF
    lines of bounded length, an optional SASL exchange, and nothing more
    read while a login is decided. A subclass words the answers."""

    reader: LineReader
    _sasl: sasl.Exchange | None = None

    def feed(self, data: bytes) -> list[Event]:
        if self.closed:
            return []
        self.reader.feed(data)
        return self._run()

    def _run(self) -> list[Event]:
        events: list[Event] = []
        try:
            while not self.closed and not self.deciding:
                line = self.reader.line()
                if line is None:
                    break
                if b"\r" in line or b"\n" in line or b"\x00" in line:
                    events += self._bad_characters()
                elif self._sasl is not None:
                    events += self._sasl_step(self._sasl.answer(line))
                else:
                    events += self._command(line)
                if any(isinstance(e, StartTLS) for e in events):
                    break
        except TooLong:
            events += self._too_long()
        return events

    def _command(self, line: bytes) -> list[Event]:
        raise NotImplementedError

    def _sasl_step(self, step: sasl.Step) -> list[Event]:
        raise NotImplementedError

    def _bad_characters(self) -> list[Event]:
        raise NotImplementedError

    def _too_long(self) -> list[Event]:
        raise NotImplementedError


class Machine(TypingProtocol):
    tls: bool

    def greeting(self) -> bytes: ...

    def feed(self, data: bytes) -> list[Event]: ...

    def login_failed(self, tag: bytes, temporary: bool, plaintext: bool = False) -> list[Event]: ...

    def take_rest(self) -> bytes: ...

    @property
    def buffered(self) -> int: ...


@attrs.frozen
class ListenerCounts:
    """What a listener holds and has relayed, for the metrics."""

    connections: int
    sessions: int  # signed in
    to_backend: int  # bytes
    to_client: int
    in_kernel: int  # sessions relayed by splice(2)
    in_python: int


class Connections(set[Any]):
    """A listener's open connections; :meth:`when_empty` fires when the
    last one leaves (the daemon's drain waits on it instead of polling)."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[Deferred[None]] = []

    def discard(self, connection: Any) -> None:
        super().discard(connection)
        if not self and self._waiting:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)  # ignored by one cancelled at its timeout

    def when_empty(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self:
            self._waiting.append(d)
        else:
            d.callback(None)
        return d


class Listener(Factory):
    """One listener of a front end, and what its connections share. A
    front end names its connection class in ``server``; the daemon reads
    it through :meth:`counts`, :meth:`open_connections` and
    :meth:`when_empty`."""

    noisy = False
    server: type = Protocol

    def __init__(self, *, reactor: Any, config: ListenerConfig, authenticator: Any,
                 sessions: Any, backend: Any, tls: Any | None,
                 budget: PreLoginBudget | None = None, metrics: Any = None) -> None:
        self.reactor = reactor
        self.metrics = metrics
        # Bytes relayed, client to backend and back: plain integers on the
        # hot path, read when metrics are scraped.
        self.relayed = [0, 0]
        # Whether plain TCP sessions without a guard are relayed by splice(2).
        self.kernel_relay = splice.available()
        self.relay_paths = [0, 0]  # sessions relayed in the kernel, in Python
        self.budget = budget or PreLoginBudget(LimitsConfig().max_connections_before_login,
                                               LimitsConfig().max_bytes_before_login)
        self.config = config
        self.authenticator = authenticator
        self.sessions = sessions
        self.backend = backend
        self.tls = tls
        self.per_source = PerSource(config.max_connections_per_source)
        # Whether XOAUTH2 and OAUTHBEARER are offered: the core's to say.
        takes = getattr(authenticator, "takes_bearer_tokens", None)
        self.bearer = bool(takes is not None and takes(config.realm))
        self.connections = Connections()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.server(self)
        protocol.factory = self
        return protocol

    def counts(self) -> ListenerCounts:
        return ListenerCounts(
            connections=len(self.connections),
            sessions=sum(1 for c in self.connections if c.username),
            to_backend=self.relayed[0], to_client=self.relayed[1],
            in_kernel=self.relay_paths[0], in_python=self.relay_paths[1])

    def open_connections(self) -> list[Any]:
        """The connections open now (a copy: shutting one down changes the set)."""
        return list(self.connections)

    def when_empty(self) -> Deferred[None]:
        """Fires once no connection is open (at once if none is)."""
        return self.connections.when_empty()


def control_reading(protocol: Any) -> None:
    """Give a client connection a ReadControl as its producer. Not during a
    TLS handshake: pausing reading then would stall the handshake."""
    protocol.reading = ReadControl(protocol.transport)
    protocol.transport.registerProducer(protocol.reading, True)


def stop_controlling_reading(protocol: Any, resume: bool = True) -> None:
    """``resume`` False: the socket stays unread (the kernel's relay takes
    it next: resuming would register it with epoll only to remove it)."""
    if protocol.reading is not None:
        protocol.transport.unregisterProducer()
        protocol.reading = None
        if resume:
            protocol.transport.resumeProducing()


def backend_failure(e: BaseException) -> dict[str, str]:
    """The audit's words for a failed backend login."""
    if isinstance(e, TokenUnavailable):
        return {"reason": "token_unavailable", "detail": e.reason}
    if isinstance(e, BackendRefused):
        return {"reason": "backend_refused", "detail": str(e)[:200]}
    return {"reason": "backend_unreachable", "detail": str(e)[:200] or type(e).__name__}


class Phase(Phases):
    """Where a relaying server's client connection is (:data:`PHASES` says
    how it gets on)."""

    NEW = "new"  # built, not yet connected
    BEFORE_LOGIN = "before login"  # the dialogue runs (``machine``)
    LOGGING_IN = "logging in"  # the core decides, then the backend logs the user in
    RELAYING = "relaying"  # in Python, both ways (``backend``)
    HELD = "relaying, held"  # in Python, the client unread until the guard's backlog is answered
    IN_KERNEL = "relaying in the kernel"  # by splice(2) (``kernel``)
    CLOSING = "closing"  # hung up: the goodbye, then TLS's close, then the socket
    GONE = "gone"  # the connection is lost


_SIGNED_IN = {"close": Phase.CLOSING, "hang_up": Phase.CLOSING, "lost": Phase.GONE}
PHASES: Moves[Phase] = Moves("relaying server", {
    Phase.NEW: {"connect": Phase.BEFORE_LOGIN, "hang_up": Phase.CLOSING, "lost": Phase.GONE},
    Phase.BEFORE_LOGIN: {"login": Phase.LOGGING_IN, **_SIGNED_IN},
    # A refusal (or a failed backend login) is answered by the dialogue,
    # which reads on; a success relays, in the kernel where it can.
    Phase.LOGGING_IN: {"refused": Phase.BEFORE_LOGIN, "relay": Phase.RELAYING,
                       "splice": Phase.IN_KERNEL, **_SIGNED_IN},
    Phase.RELAYING: {"hold": Phase.HELD, **_SIGNED_IN},
    Phase.HELD: {"release": Phase.RELAYING, **_SIGNED_IN},
    Phase.IN_KERNEL: {"handed_back": Phase.RELAYING, **_SIGNED_IN},
    # Closing stops the kernel's relay, which hands the session back.
    Phase.CLOSING: {"handed_back": Phase.CLOSING, "hang_up": Phase.CLOSING, "lost": Phase.GONE},
    Phase.GONE: {"handed_back": Phase.GONE, "hang_up": Phase.GONE},
})
_PAST_LOGIN = frozenset({Phase.RELAYING, Phase.HELD, Phase.IN_KERNEL})


@implementer(IHandshakeListener)
class RelayingServer(ListenerConnection, Protocol):
    """A client connection: pre-login dialogue, login, then relay. Its
    phase is one :class:`Phase`, moved only as :data:`PHASES` allows;
    ``machine``, ``backend`` and ``kernel`` are what the phase works with,
    not what says where it is."""

    protocol_name = ""
    MOVES = PHASES
    ENDED = frozenset({Phase.CLOSING, Phase.GONE})
    phase = Phase.NEW
    kernel: splice.KernelRelay | None = None  # relaying in the kernel, while it does

    def __init__(self, listener: Listener) -> None:
        self._attributes()
        self._backend_tail = b""
        self.kernel = None
        self.listener = listener
        self.config = listener.config
        self.address = "unknown"
        self.port = 0
        self.machine: Machine | None = None
        self.backend: Any = None
        self.reading: ReadControl | None = None
        self.guard: Guard | None = None
        self._timer: Any = None
        self._counted = False

    # -- what a front end supplies ----------------------------------------------------------

    def make_machine(self) -> Machine:
        raise NotImplementedError

    def machine_settings(self, bad_commands: int) -> dict[str, Any]:
        """What every dialogue before login takes from the listener's config."""
        return dict(
            tls=self.config.tls == "implicit",
            starttls=self.config.tls == "starttls" and self.listener.tls is not None,
            allow_plaintext=self.config.allow_plaintext_auth,
            max_line=self.config.max_line_length,
            max_bad=self.config.max_bad_commands or bad_commands,
            bearer=self.listener.bearer,
        )

    def bye(self, text: str) -> bytes:
        """The protocol's way of saying goodbye before closing."""
        raise NotImplementedError

    def logged_in(self, event: Login, backend: Any) -> bytes:
        """The answer to a successful login."""
        raise NotImplementedError

    def make_guard(self) -> Guard | None:
        """What follows the relayed session, if anything must (None: bytes
        pass as they are)."""
        return None

    # -- connection --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        if not self._enter(self.bye("Too many connections from your address.")):
            return
        self._move("connect")
        if self.config.tls != "implicit":
            control_reading(self)
        self.machine = self.make_machine()
        write_now(self.transport, self.machine.greeting())
        self._timer = self.listener.reactor.callLater(self.config.login_timeout, self._idle)

    def connectionLost(self, reason: Any = None) -> None:
        if self.kernel is not None:
            self.kernel.stop(ended=0)
        self._leave()
        self.listener.sessions.remove(self)  # if it signed in; nothing if not
        if self.backend is not None:
            self.backend.close()

    def _past_login(self) -> bool:
        return self.phase in _PAST_LOGIN

    def _idle(self) -> None:
        self.close("Idle for too long.")

    def close(self, text: str) -> None:
        if self._closing:
            return
        self._move("close")
        if self.kernel is not None:
            self.kernel.stop()
        if self.backend is not None:
            # Stop relaying first, so that the goodbye does not land inside a response.
            self.backend.detach()
            self.backend.close()
        self.transport.write(self.bye(text))
        self._hang_up()

    def shut_down(self) -> None:
        self.close("Server shutting down.")

    def revoke(self, reason: str) -> None:
        """The session registry ends this session."""
        log.info("{address}: ending the {protocol} session of {user}: {reason}",
                 address=self.address, protocol=self.protocol_name, user=self.username,
                 reason=reason)
        self.close("Session ended: its credentials are no longer valid.")

    # -- client → proxy ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            self._dropped(data)
            return
        self._touch()
        if self.phase in _PAST_LOGIN:
            self.listener.relayed[0] += len(data)
            if self.guard is not None:
                self._guarded(self.guard.feed_client(data))
            else:
                write_now(self.backend.transport, data)
            return
        assert self.machine is not None
        events = self.machine.feed(data)
        if not self._within_budget(self.machine.buffered):
            self.close("Too busy, try again later.")
            return
        self._run(events)

    def _run(self, events: list[Event]) -> None:
        for event in events:
            if self._closing:
                return
            if isinstance(event, Send):
                write_now(self.transport, event.data)
            elif isinstance(event, StartTLS):
                stop_controlling_reading(self)
                self.transport.startTLS(self.listener.tls)
                faster_tls(self.transport)
            elif isinstance(event, Login):
                self._move("login")
                d = Deferred.fromCoroutine(self._login(event)).addErrback(self._crashed)
                if not d.called and self.reading is not None:
                    # Decided later (cache hits are decided at once): stop
                    # reading until then.
                    self.reading.hold("decision")
            elif isinstance(event, Close):
                self._hang_up()

    async def _login(self, event: Login) -> None:
        assert self.machine is not None
        attempt = Attempt(
            protocol=self.protocol_name,
            realm=self.config.realm,
            username=event.username,
            secret=event.secret,
            client_address=self.address,
            tls=self.machine.tls,
            authzid=event.authzid,
            plaintext_allowed=self.config.allow_plaintext_auth,
            bearer=event.mechanism in ("xoauth2", "oauthbearer"),
        )
        decision: Decision = await self.listener.authenticator.authenticate(attempt)
        if self._closing:
            return
        if not decision.accepted:
            temporary = decision.outcome is Outcome.TEMPORARY_FAILURE
            self._refused(event, temporary, plaintext=decision.reason is Reason.PLAINTEXT)
            return
        started = self.listener.reactor.seconds()
        metrics = self.listener.metrics
        try:
            backend = await self.listener.backend.login(decision.username, self.address, self.port)
            if metrics is not None:
                metrics.backend_login(self.config.label, True, self.listener.reactor.seconds() - started)
        except LOGIN_FAILURES as e:
            # The backend said no, or could not be reached in time, or no
            # access token could be had for it: audited, and the client
            # hears its protocol's temporary failure.
            if metrics is not None:
                metrics.backend_login(self.config.label, False, 0.0)
            log.warn("{address}: the {protocol} backend did not log {user} in: {error}",
                     address=self.address, protocol=self.protocol_name, user=decision.username,
                     error=str(e) or type(e).__name__)
            self.listener.authenticator.backend_failed(
                attempt, decision, listener=self.config.label, **backend_failure(e))
            if not self._closing:
                self._refused(event, temporary=True)
            return
        except Exception:
            # A bug in the backend's login, not the backend's answer: said as
            # one, with its traceback; the client may try again.
            if metrics is not None:
                metrics.backend_login(self.config.label, False, 0.0)
            log.failure("{address}: logging {user} in to the {protocol} backend failed "
                        "unexpectedly", address=self.address, protocol=self.protocol_name,
                        user=decision.username)
            if not self._closing:
                self._refused(event, temporary=True)
            return
        if self._closing:
            backend.close()
            return
        if not self.listener.sessions.still_valid(decision):
            # Revoked while the backend logged the user in.
            backend.close()
            self._refused(event, temporary=False)
            return
        self._signed_in(decision)
        rest = self.machine.take_rest()
        self.machine = None
        self.backend = backend
        self.guard = self.make_guard()
        backend.attach(self)
        answer = self.logged_in(event, backend)
        backend.capabilities = b""  # said; not kept for the session's life
        in_kernel = (self.guard is None and self.listener.kernel_relay
                     and splice.plain_tcp(self.transport) and splice.plain_tcp(backend.transport))
        stop_controlling_reading(self, resume=not in_kernel)
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.config.idle_timeout)
        if in_kernel:
            self._move("splice")
            self.kernel = splice.KernelRelay(
                self.listener.reactor, self.transport, backend.transport, self)
            self.listener.relay_paths[0] += 1
            self.kernel.start(to_client=answer, to_backend=rest)
            return
        self._move("relay")
        self.listener.relay_paths[1] += 1
        write_now(self.transport, answer)
        self._relay_in_python()
        if rest:
            self.dataReceived(rest)

    def _refused(self, event: Login, temporary: bool, plaintext: bool = False) -> None:
        """The login failed: the dialogue says so, and reads on."""
        assert self.machine is not None
        self._move("refused")
        self._resume()
        self._run(self.machine.login_failed(event.tag, temporary, plaintext=plaintext))

    def handed_back(self, backend_tail: bytes | None) -> None:
        """The kernel's relay ends: relay in Python from here on (unless it
        ended because the session is closing)."""
        self._backend_tail = backend_tail
        self.kernel = None
        self._move("handed_back")
        self._relay_in_python()

    def backend_ended(self, backend_tail: bytes | None) -> None:
        """The backend's stream ended while the kernel relayed the session
        (Twisted loses its connection next, or has: :meth:`backend_lost`)."""
        self._backend_tail = backend_tail
        self.kernel = None
        self._move("handed_back")

    def client_ended(self, backend_tail: bytes | None) -> None:
        """The client's stream ended while the kernel relayed the session
        (Twisted loses its connection next, or has: :meth:`connectionLost`)."""
        self._backend_tail = backend_tail
        self.kernel = None
        self._move("handed_back")

    def _relay_in_python(self) -> None:
        """Relay through Twisted: from login, or when the kernel's relay
        hands the session back."""
        if self.phase is not Phase.RELAYING:
            return
        # From here on, flow control is between the two sides: a slow reader
        # pauses the other side.
        backend = self.backend
        # Larger reads mean fewer trips through Python for a large message.
        for transport in (self.transport, backend.transport):
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = RELAY_READ_SIZE
        self.transport.registerProducer(backend.transport, True)
        backend.transport.registerProducer(self.transport, True)
        # Reading again, if the kernel's relay had stopped it.
        self.transport.resumeProducing()
        backend.transport.resumeProducing()

    def relayed(self, index: int, n: int) -> None:
        """The kernel relayed ``n`` bytes (index 0: from the client)."""
        self.listener.relayed[index] += n
        self._touch()

    def handshakeCompleted(self) -> None:
        if self.reading is None and self.phase in (Phase.BEFORE_LOGIN, Phase.LOGGING_IN):
            control_reading(self)

    def _resume(self) -> None:
        if self.reading is not None:
            self.reading.release("decision")

    # -- proxy ← backend ------------------------------------------------------------------------

    _backend_tail: bytes | None = b""

    def from_backend(self, data: bytes) -> None:
        self._touch()
        self.listener.relayed[1] += len(data)
        # The end of it, for backend_lost to know how the session ended.
        tail = self._backend_tail or b""
        self._backend_tail = (tail + data)[-512:] if len(data) < 512 else data[-512:]
        if self.guard is not None:
            self._guarded(self.guard.feed_backend(data))
        else:
            write_now(self.transport, data)

    def _guarded(self, events: list[ToBackend | ToClient]) -> None:
        assert self.guard is not None and self.backend is not None
        for event in events:
            if isinstance(event, ToBackend):
                write_now(self.backend.transport, event.data)
            else:
                write_now(self.transport, event.data)
        # The guard holds client bytes while the backend has yet to answer:
        # past one read's worth, stop reading the client until it has.
        hold = self.guard.waiting > RELAY_READ_SIZE
        if hold and self.phase is Phase.RELAYING:
            self._move("hold")
            self.transport.pauseProducing()
        elif not hold and self.phase is Phase.HELD:
            self._move("release")
            self.transport.resumeProducing()

    def backend_lost(self) -> None:
        """The backend closed the session: after its own goodbye (the
        client's logout), close; if it died without one, tell the client."""
        if self.kernel is not None:
            self.kernel.stop(ended=1)
        if self._closing:
            return
        # None: the kernel relayed the end unseen; say nothing rather than
        # risk a second goodbye after the backend's own.
        if self._backend_tail is not None and not self.backend_said_goodbye(self._backend_tail):
            self.transport.write(self.bye("The mail server closed the connection."))
        self._hang_up()

    def backend_said_goodbye(self, last: bytes) -> bool:
        """Whether ``last`` (the end of what the backend sent) is the
        protocol's goodbye."""
        raise NotImplementedError

    def _crashed(self, failure: Any) -> None:
        log.failure("{address}: a {protocol} login failed unexpectedly", failure,
                    address=self.address, protocol=self.protocol_name)
        self.close("Internal error.")
