"""The LDAP front end: simple binds from appliances, decided by the core,
then the session relayed to the upstream directory.

It speaks just enough LDAP to do its job (see :mod:`proxy.wire.ber`):
it reads binds, StartTLS, "Who am I?", unbind and the tag of every other
request; everything else is relayed as bytes on the session's own
connection to the directory (:class:`proxy.backends.ldap.DirectorySession`).
:class:`LDAPSession` is the session as a state machine with no I/O (bytes
and decided binds in, actions out); :class:`LDAPServer` carries the actions
out. It decides nothing: the Authenticator does, and an app-password
session is read-only because the Decision says so.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from proxy.auth import Attempt, Decision, Outcome, Reason, ldappolicy
from proxy.backends.ldap import (
    OWN_ID,
    DirectorySession,
    UpstreamLDAP,
    Upstream,
    UpstreamRefused,
)
from proxy.tls import faster_tls
from proxy.transports import write_now
from proxy.wire import ber
from proxy.frontends.base import (
    Listener,
    ListenerConnection,
    Moves,
    Phases,
    ReadControl,
    control_reading,
    stop_controlling_reading,
)

log = Logger(namespace="legacy_auth_proxy.frontends.ldap")


# -- the session as a state machine ---------------------------------------------------


@attrs.frozen
class Reply:
    data: bytes


@attrs.frozen
class BeginTLS:
    """The go-ahead has been sent: start TLS now, before reading anything else."""


@attrs.frozen
class DecideBind:
    """Ask the core (a simple bind with a name and a password, or an
    anonymous one), then answer with :meth:`LDAPSession.bound`."""

    message: ber.Message
    name: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class Forget:
    """A bind begins: whoever the client was, it is no longer."""

    was_bound: bool = False  # a bind had succeeded (anonymous ones too)


@attrs.frozen
class Relay:
    """To the directory as the session's identity."""

    message: ber.Message
    frame: bytes


@attrs.frozen
class Abandon:
    frame: bytes


@attrs.frozen
class Disconnect:
    """A notice of disconnection (RFC 4511 4.4.1), then close."""

    code: int
    text: str


@attrs.frozen
class Hangup:
    """The client unbound: close without a word."""




@attrs.frozen
class Refused:
    """A request the session's policy refuses: answered, and reported to be
    audited."""

    message: ber.Message
    refusal: ldappolicy.Refusal


Action = (Reply | BeginTLS | DecideBind | Forget | Relay | Abandon | Disconnect | Hangup
          | Refused)


@attrs.frozen
class Identity:
    kind: str  # "primary", "app_password" or "anonymous"
    dn: str = ""
    # What the session may do, as the core decided with the bind.
    policy: ldappolicy.SessionPolicy = ldappolicy.PRIMARY

    @property
    def read_only(self) -> bool:
        return self.policy.read_only


class Bind(Phases):
    """Where an LDAP session is with its binds (:data:`BINDS` says how it
    gets on)."""

    UNBOUND = "unbound"  # no identity: never bound, or the last bind failed
    BINDING = "binding"  # a bind is decided; what follows it waits
    BOUND = "bound"  # an identity (an anonymous bind's too)
    CLOSED = "closed"  # nothing more is read


BINDS: Moves[Bind] = Moves("LDAP session", {
    Bind.UNBOUND: {"bind": Bind.BINDING, "close": Bind.CLOSED},
    Bind.BINDING: {"accepted": Bind.BOUND, "refused": Bind.UNBOUND, "close": Bind.CLOSED},
    Bind.BOUND: {"bind": Bind.BINDING, "close": Bind.CLOSED},
    # A bind decided after the close is dropped unanswered.
    Bind.CLOSED: {"accepted": Bind.CLOSED, "refused": Bind.CLOSED, "close": Bind.CLOSED},
})


class LDAPSession:
    """An LDAP client connection as the proxy sees it, with no I/O: bytes and
    decided binds in, actions out. It frames and checks messages, answers
    what the proxy answers itself (StartTLS, "Who am I?", refusals), queues
    what arrives while a bind is decided, and says what goes to the
    directory, rewritten for app-password sessions so that they read with
    their user's rights and nothing more.

    Its phase is one :class:`Bind`, moved only as :data:`BINDS` allows.
    Beside it, one fact that only ever turns true: a connection to the
    directory may exist (a bind succeeded, or the connection says so through
    :meth:`directory_connected`), after which StartTLS is refused."""

    def __init__(self, *, tls: bool, starttls: bool, max_before_bind: int,
                 max_after_bind: int, max_depth: int) -> None:
        self.tls = tls
        self.starttls = starttls
        self.max_before_bind = max_before_bind
        self.max_after_bind = max_after_bind
        self.max_depth = max_depth
        self.framer = ber.Framer(max_before_bind, max_depth)
        self.identity: Identity | None = None  # set in BOUND, and only there
        self.phase = Bind.UNBOUND
        self._directory_may_exist = False
        self._queued: deque[bytes] = deque()

    def _move(self, event: str) -> None:
        self.phase = BINDS.after(self.phase, event)

    @property
    def closed(self) -> bool:
        return self.phase is Bind.CLOSED

    @property
    def binding(self) -> bool:
        return self.phase is Bind.BINDING

    @property
    def buffered(self) -> int:
        return self.framer.buffered + sum(len(f) for f in self._queued)

    def close(self) -> None:
        """Nothing more is read; what was held is let go at once."""
        self._move("close")
        self.framer = ber.Framer(0, self.max_depth)
        self._queued.clear()

    def directory_connected(self) -> None:
        """The session's connection to the directory is open: StartTLS can
        no longer come first."""
        self._directory_may_exist = True

    @property
    def signed_in(self) -> bool:
        return self.identity is not None and self.identity.kind != "anonymous"

    # -- input ----------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Action]:
        if self.closed:
            return []
        try:
            frames = self.framer.feed(data)
        except ber.BERError as e:
            return self._disconnect(ber.PROTOCOL_ERROR, "malformed message", str(e))
        actions: list[Action] = []
        for frame in frames:
            if self.closed:
                break
            if self.binding:
                self._queued.append(frame)
                continue
            actions += self._frame(frame)
            if actions and isinstance(actions[-1], BeginTLS):  # it comes last (_start_tls)
                break  # the rest was sent in the clear: dropped unread
        return actions

    def bound(self, message: ber.Message, code: int, text: str = "",
              identity: Identity | None = None) -> list[Action]:
        """The bind of :class:`DecideBind` is decided: answer it, become
        ``identity`` (if it succeeded), and go on with what was queued."""
        accepted = identity is not None and code == ber.SUCCESS
        self._move("accepted" if accepted else "refused")
        if self.closed:
            return []
        if accepted:
            assert identity is not None
            self.identity = identity
            self._directory_may_exist = True
            if identity.kind != "anonymous":  # anonymous sessions keep the limits before a bind
                self.framer.max_size = self.max_after_bind
        actions: list[Action] = [Reply(ber.result(message.id, ber.BIND_RESPONSE, code, text))]
        while self._queued and not self.binding and not self.closed:
            actions += self._frame(self._queued.popleft())
        return actions

    # -- one message ------------------------------------------------------------------

    def _disconnect(self, code: int, text: str, why: str = "") -> list[Action]:
        if why:
            log.info("malformed LDAP: {error}", error=why)
        self._move("close")
        return [Disconnect(code, text)]

    def _frame(self, frame: bytes) -> list[Action]:
        try:
            message = ber.parse_message(frame)
        except ber.BERError as e:
            return self._disconnect(ber.PROTOCOL_ERROR, "malformed message", str(e))
        if message.id in (0, OWN_ID):
            # 0 is the server's own (RFC 4511 4.4); OWN_ID is the proxy's.
            return self._disconnect(ber.PROTOCOL_ERROR, "message id not allowed")
        tag = message.op_tag
        if tag == ber.BIND_REQUEST:
            return self._bind(message)
        if tag == ber.UNBIND_REQUEST:
            self._move("close")
            return [Hangup()]
        if tag == ber.EXTENDED_REQUEST:
            return self._extended(message, frame)
        if tag == ber.ABANDON_REQUEST:
            return [Abandon(frame)]
        if tag in ber.RESPONSE_TAG:
            return self._operation(message, frame)
        return self._disconnect(ber.PROTOCOL_ERROR, "unknown operation")

    @staticmethod
    def _answer(message: ber.Message, code: int, text: str = "") -> Reply:
        tag = ber.RESPONSE_TAG.get(message.op_tag, ber.EXTENDED_RESPONSE)
        return Reply(ber.result(message.id, tag, code, text))

    def _bind(self, message: ber.Message) -> list[Action]:
        # A new bind first drops the old identity; a failed one leaves the
        # connection anonymous (RFC 4511 4.2.1).
        was_bound = self.phase is Bind.BOUND
        self._move("bind")
        self.identity = None
        self.framer.max_size = self.max_before_bind
        actions: list[Action] = [Forget(was_bound)]
        try:
            bind = ber.parse_bind(message)
        except ber.BERError:
            return actions + [self._bind_answer(message, ber.PROTOCOL_ERROR, "malformed bind request")]
        if bind.version != 3:
            return actions + [self._bind_answer(message, ber.PROTOCOL_ERROR,
                                                "only LDAP version 3 is supported")]
        if bind.password is None:
            return actions + [self._bind_answer(message, ber.AUTH_METHOD_NOT_SUPPORTED,
                                                "only simple binds are supported")]
        if bind.name and not bind.password:
            # RFC 4513 5.1.2: an unauthenticated bind; never passed on.
            return actions + [self._bind_answer(message, ber.UNWILLING_TO_PERFORM,
                                                "unauthenticated binds are not allowed")]
        # The password's bytes reach the directory unchanged, even if not UTF-8.
        return actions + [DecideBind(message, bind.name.decode("utf-8", "replace"),
                                     bind.password.decode("utf-8", "surrogateescape"))]

    def _bind_answer(self, message: ber.Message, code: int, text: str) -> Reply:
        """A bind the session refuses itself, without the core."""
        self._move("refused")
        return Reply(ber.result(message.id, ber.BIND_RESPONSE, code, text))

    def _extended(self, message: ber.Message, frame: bytes) -> list[Action]:
        try:
            request = ber.parse_extended(message)
        except ber.BERError:
            return self._disconnect(ber.PROTOCOL_ERROR, "malformed extended request")
        if request.name == ber.START_TLS:
            return self._start_tls(message)
        if request.name == ber.WHO_AM_I:
            identity = b"dn:" + self.identity.dn.encode() if self.signed_in else b""  # type: ignore[union-attr]
            return [Reply(ber.extended_response(message.id, ber.SUCCESS, value=identity))]
        if self.identity is None:
            return [self._answer(message, ber.OPERATIONS_ERROR, "a successful bind is needed first")]
        refusal = self.identity.policy.extended()
        if refusal is not None:
            return [Refused(message, refusal)]
        return [Relay(message, frame)]

    def _start_tls(self, message: ber.Message) -> list[Action]:
        if self.tls:
            return [self._answer(message, ber.OPERATIONS_ERROR, "TLS is already in use")]
        if not self.starttls:
            return [self._answer(message, ber.PROTOCOL_ERROR, "StartTLS is not offered here")]
        if self.phase is not Bind.UNBOUND or self._directory_may_exist or self._queued:
            return [self._answer(message, ber.OPERATIONS_ERROR, "StartTLS must come before a bind")]
        self.tls = True
        # Whatever the client sent after the request, in the clear, is
        # dropped unread: nothing sent before TLS is acted on after it.
        self.framer = ber.Framer(self.framer.max_size, self.max_depth)
        return [self._answer(message, ber.SUCCESS), BeginTLS()]

    def _operation(self, message: ber.Message, frame: bytes) -> list[Action]:
        if self.identity is None:
            return [self._answer(message, ber.OPERATIONS_ERROR, "a successful bind is needed first")]
        try:
            verdict = self.identity.policy.request(message)
        except ber.BERError:
            return self._disconnect(ber.PROTOCOL_ERROR, "malformed request")
        if isinstance(verdict, ldappolicy.Refusal):
            return [Refused(message, verdict)]
        return [Relay(message, verdict)]


# -- the connection ---------------------------------------------------------------------


@implementer(IHandshakeListener)
class LDAPServer(ListenerConnection, Protocol):
    """Carries out what :class:`LDAPSession` says: writes to the client,
    asks the core, keeps the session's connection to the directory (a
    :class:`proxy.backends.ldap.DirectorySession`) and the timers."""

    def __init__(self, listener: LDAPListener) -> None:
        self._attributes()
        self.listener = listener
        self.config = listener.config
        self.session: LDAPSession | None = None
        self.directory: DirectorySession | None = None
        self.decision: Decision | None = None  # the signed-in identity's decision
        self.reading: ReadControl | None = None

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        config = self.config
        upstream = self.listener.upstream
        self.session = LDAPSession(
            tls=config.tls == "implicit",
            starttls=config.tls == "starttls" and self.listener.tls is not None,
            max_before_bind=config.max_message_size_before_bind,
            max_after_bind=config.max_message_size,
            max_depth=config.max_ber_depth,
        )
        self.directory = DirectorySession(
            opener=upstream.open, clock=self.listener.reactor, timeout=upstream.config.timeout,
            on_frame=self._from_directory, on_lost=self._directory_lost,
            on_connected=self._directory_connected,
        )
        if not self._enter(ber.notice_of_disconnection(ber.BUSY, "too many connections")):
            log.info("{address}: too many connections to {listener}", address=self.address,
                     listener=config.label)
            return
        self._move("connect")
        if not self.session.tls:
            control_reading(self)
        self._arm(config.login_timeout)

    def connectionLost(self, reason: Any = None) -> None:
        self._leave()
        self._forget()
        if self.session is not None:
            self.session.close()
        if self.directory is not None:
            self.directory.end()
        # The directory session's callbacks point back here: break the
        # cycle, so that the connection is freed now, not at the next
        # collection.
        self.directory = None

    def _arm(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            # Moving a timer later is cheap in Twisted (no heap work until it
            # is due); binds re-arm it every time.
            self._timer.reset(seconds)
        else:
            self._timer = self.listener.reactor.callLater(seconds, self._idle)

    def _past_login(self) -> bool:
        return self.session is not None and self.session.identity is not None

    def _idle(self) -> None:
        self.disconnect(ber.UNAVAILABLE, "idle for too long")

    def disconnect(self, code: int, text: str) -> None:
        """Notice of disconnection (RFC 4511 4.4.1), then close."""
        if self._closing:
            return
        assert self.session is not None and self.directory is not None
        self.session.close()
        self.transport.write(ber.notice_of_disconnection(code, text))
        self._hang_up()
        self._forget()
        self.directory.close()

    def shut_down(self) -> None:
        self.disconnect(ber.UNAVAILABLE, "the server is shutting down")

    def revoke(self, reason: str) -> None:
        """The session registry ends this session."""
        log.info("{address}: ending the session of {user}: {reason}", address=self.address,
                 user=self.username, reason=reason)
        self.disconnect(ber.UNAVAILABLE, "the session's credentials are no longer valid")

    # -- client → proxy -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self.session is None:
            self._dropped(data)
            return
        self._touch()
        actions = self.session.feed(data)
        if not self.session.signed_in and not self._within_budget(self.session.buffered):
            self.disconnect(ber.BUSY, "too busy, try again later")
            return
        self._act(actions)

    def _act(self, actions: list[Action]) -> None:
        assert self.directory is not None
        for action in actions:
            if self._closing:
                return
            if isinstance(action, Reply):
                write_now(self.transport, action.data)
            elif isinstance(action, Relay):
                self.listener.relayed[0] += len(action.frame)
                message = action.message
                self.directory.send(action.frame,
                                    lambda code, text, fatal, m=message: self._refused(m, code, text, fatal))
                if self.directory.busy:
                    self._hold("directory")
            elif isinstance(action, DecideBind):
                answer = self._bind_at_once(action)
                if answer is not None:
                    self._act(self.session.bound(action.message, *answer))
                    continue
                d = Deferred.fromCoroutine(self._bind(action))
                d.addErrback(self._crashed)
                if not d.called:
                    # Decided later (cache hits are decided at once): stop
                    # reading until then.
                    self._hold("bind")
            elif isinstance(action, Refused):
                self._refuse(action)
            elif isinstance(action, Forget):
                self._forget(rearm=action.was_bound)
            elif isinstance(action, Abandon):
                self.directory.abandon(action.frame)
            elif isinstance(action, BeginTLS):
                stop_controlling_reading(self)
                self.transport.startTLS(self.listener.tls)
                faster_tls(self.transport)
            elif isinstance(action, Disconnect):
                self.disconnect(action.code, action.text)
            elif isinstance(action, Hangup):
                self._hang_up()
                self._forget()
                self.directory.close()

    def _refuse(self, action: Refused) -> None:
        """Answer a request the session's policy refuses, and have it audited."""
        refusal = action.refusal
        write_now(self.transport, LDAPSession._answer(action.message, refusal.code,
                                                      refusal.text).data)
        decision = self.decision
        self.listener.authenticator.events.session_refused(
            user=decision.username if decision is not None else "", protocol="ldap",
            realm=self.config.realm, client_address=self.address, why=refusal.why)

    def _refused(self, message: ber.Message, code: int, text: str, fatal: bool) -> None:
        """A request the directory session could not relay."""
        self._release("directory")
        if self._closing:
            return
        if fatal:
            # A primary-password session lost its bound connection: the proxy
            # keeps no password to bind again.
            self.disconnect(code, text)
            return
        self.transport.write(LDAPSession._answer(message, code, text).data)

    # -- bind ----------------------------------------------------------------------------

    async def _bind(self, action: DecideBind) -> None:
        try:
            code, text, identity = await self._bind_result(action)
        finally:
            self._release("bind")
        if self._closing or self.session is None:
            return
        self._act(self.session.bound(action.message, code, text, identity))

    def _bind_at_once(self, action: DecideBind) -> tuple[int, str, Identity] | None:
        """A bind the core can decide from memory alone (an app password in
        its success cache): answered in this turn, without a coroutine.
        None: decide it the usual way."""
        if not action.name or not action.password or self.directory is None:
            return None
        decision = self.listener.authenticator.decide_cached(self._attempt(action.name, action.password))
        if decision is None:
            return None
        assert decision.account is not None
        wanted = decision.reads_as
        self._become(decision, wanted, self.listener.upstream.password_of(wanted), lazy=True)
        return ber.SUCCESS, "", Identity("app_password", decision.account.dn,
                                         ldappolicy.for_decision(decision))

    async def _bind_result(self, action: DecideBind) -> tuple[int, str, Identity | None]:
        authenticator = self.listener.authenticator
        attempt = self._attempt(action.name, action.password)
        if not action.name and not action.password:
            if not authenticator.anonymous(attempt).accepted:
                return ber.INAPPROPRIATE_AUTHENTICATION, "anonymous binds are not allowed", None
            self._become(None, None, "", lazy=True)
            return ber.SUCCESS, "", Identity("anonymous", policy=ldappolicy.ANONYMOUS)
        decision = await authenticator.authenticate(attempt)
        if self._closing:
            return ber.UNAVAILABLE, "", None
        if decision.reason is Reason.PLAINTEXT:
            return ber.CONFIDENTIALITY_REQUIRED, "use StartTLS or LDAPS", None
        if decision.outcome is Outcome.TEMPORARY_FAILURE:
            code = ber.BUSY if decision.reason is Reason.BUSY else ber.UNAVAILABLE
            return code, "try again later", None
        if not decision.accepted:
            return ber.INVALID_CREDENTIALS, "", None
        assert decision.account is not None and self.directory is not None
        # With whose rights the session reads is the core's to say.
        wanted = decision.reads_as
        if decision.read_only:
            # App passwords: the directory is asked as the reading account,
            # and only when the session first needs it.
            password = self.listener.upstream.password_of(wanted)
        else:
            password = action.password
            try:
                await self.directory.bind_as(wanted, password)
            except UpstreamRefused:
                log.warn("{address}: the directory refused the session's bind for {user}",
                         address=self.address, user=decision.username)
                return ber.UNAVAILABLE, "try again later", None
            except Exception as e:
                log.warn("{address}: cannot reach the directory: {error}", address=self.address,
                         error=str(e) or type(e).__name__)
                return ber.UNAVAILABLE, "try again later", None
        if self._closing:
            return ber.UNAVAILABLE, "", None
        if not self.listener.sessions.still_valid(decision):
            return ber.INVALID_CREDENTIALS, "", None  # revoked while the bind was under way
        self._become(decision, wanted, password, lazy=decision.read_only)
        kind = "app_password" if decision.read_only else "primary"
        return ber.SUCCESS, "", Identity(kind, decision.account.dn,
                                         ldappolicy.for_decision(decision))

    def _attempt(self, name: str, password: str) -> Attempt:
        return Attempt(
            protocol="ldap",
            realm=self.config.realm,
            username=name,
            secret=password,
            client_address=self.address,
            tls=self.session.tls if self.session is not None else False,
            plaintext_allowed=self.config.allow_plaintext_auth,
            anonymous_allowed=self.config.allow_anonymous,
        )

    def _become(self, decision: Decision | None, wanted: str | None, password: str,
                lazy: bool) -> None:
        assert self.directory is not None
        # Lazy: the proxy may (re)bind the directory connection by itself, as
        # the reading account or anonymously. A primary-password session's
        # connection is bound with the user's password once, at the bind.
        self.directory.want(wanted, password if lazy else "", lazy)
        if decision is not None:
            self.decision = decision
            self._signed_in(decision)
        self._arm(self.config.idle_timeout)

    def _forget(self, rearm: bool = False) -> None:
        """Forget who the client is. The connection to the directory stays
        open for the next identity (it is re-bound before it is used).
        ``rearm``: the client was bound, and binds again: a new deadline."""
        if self.decision is not None:
            self.listener.sessions.remove(self)
            self.decision = None
            if not self._closing and not self.listener.budget.admit(self, force=True):
                # Back among the connections not signed in, if there is room.
                self.disconnect(ber.BUSY, "too busy, try again later")
                return
        self.username = self.dn = ""
        self.app_password_id = None
        if self.directory is not None:
            self.directory.want(None, "", lazy=True)
        if rearm and not self._closing and self.transport is not None:
            # A new deadline to bind again; failed binds do not extend it.
            self._arm(self.config.login_timeout)

    # -- reading ------------------------------------------------------------------------

    def handshakeCompleted(self) -> None:
        if self.reading is None and (self.directory is None or self.directory.upstream is None) \
                and not self._closing:
            control_reading(self)

    def _hold(self, reason: str) -> None:
        if self.reading is not None:
            self.reading.hold(reason)

    def _release(self, reason: str) -> None:
        if self.reading is not None:
            self.reading.release(reason)

    def _directory_connected(self, upstream: UpstreamLDAP) -> None:
        self._release("directory")
        if self.session is not None:
            self.session.directory_connected()
        if self._closing:
            return
        # Flow control both ways: a slow reader pauses the other side.
        stop_controlling_reading(self)
        self.transport.registerProducer(upstream.transport, True)
        upstream.transport.registerProducer(self.transport, True)

    def _read_on_our_own(self) -> None:
        """Back to ReadControl once no directory connection paces the client."""
        if self.transport is None or self._closing:
            return
        self.transport.unregisterProducer()
        self.transport.resumeProducing()
        control_reading(self)

    # -- proxy ← directory --------------------------------------------------------------

    def _from_directory(self, frame: bytes) -> None:
        self._touch()
        self.listener.relayed[1] += len(frame)
        # By whom the connection is bound, not who the client is now: the
        # answers to an app-password session's requests are filtered even
        # when they arrive after the client began another bind.
        upstream = self.directory.upstream if self.directory is not None else None
        if upstream is None or self.listener.upstream.reads_for_others(upstream.bound_as):
            frame = ldappolicy.readable(frame, self.listener.upstream.is_hidden)
            if not frame:
                return  # the reading account's own entry
        write_now(self.transport, frame)

    def _directory_lost(self) -> None:
        self._read_on_our_own()
        if self.session is not None and self.session.identity is not None:
            # Requests may have been under way: the client must not wait for them.
            self.disconnect(ber.UNAVAILABLE, "the directory closed the connection")

    def _crashed(self, failure: Any) -> None:
        log.failure("{address}: a bind failed unexpectedly", failure, address=self.address)
        self.disconnect(ber.OPERATIONS_ERROR, "internal error")


class LDAPListener(Listener):
    """One LDAP listener: its config, TLS, and what its sessions share. Its
    backend is the directory (``upstream``)."""

    server = LDAPServer

    def __init__(self, *, backend: Upstream, **common: Any) -> None:
        super().__init__(backend=backend, **common)
        self.upstream = backend
