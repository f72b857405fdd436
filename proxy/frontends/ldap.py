"""The LDAP front end: simple binds from appliances, decided by the core,
then the session relayed to the upstream directory.

It speaks just enough LDAP to do its job (see :mod:`proxy.wire.ber`):
it reads binds, StartTLS, "Who am I?", unbind and the tag of every other
request; everything else is relayed as bytes on the session's own
connection to the directory. It decides nothing: the Authenticator does,
and an app-password session is read-only because the Decision says so.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from proxy.auth import Attempt, Decision, Outcome, Reason
from proxy.backends.ldap import OWN_ID, UpstreamLDAP, UpstreamRefused, open_upstream
from proxy.config import DirectoryConfig
from proxy.directory import normalise_dn
from proxy.wire import ber
from proxy.frontends.base import (
    Listener,
    ListenerConnection,
    ReadControl,
    control_reading,
    stop_controlling_reading,
)

log = Logger(namespace="legacy_auth_proxy.frontends.ldap")


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

    def __attrs_post_init__(self) -> None:
        self.hidden = frozenset(
            normalise_dn(dn) for dn in (self.config.bind_dn, self.config.search_bind_dn) if dn
        )

    @property
    def proxied(self) -> bool:
        """App-password sessions read with RFC 4370's control, as the user."""
        return self.config.app_password_reads == "proxied_authorization"

    @property
    def reader(self) -> str:
        """Whom an app-password session's connection is bound as."""
        if self.proxied:
            return self.config.bind_dn
        assert self.config.search_bind_dn is not None
        return self.config.search_bind_dn

    @property
    def reader_password(self) -> str:
        return self.service_password if self.proxied else self.search_password

    def is_hidden(self, name: bytes) -> bool:
        text = name.decode("utf-8", "replace").lower()
        return any(h.split(",", 1)[0] in text.replace(" ", "") for h in self.hidden) \
            and normalise_dn(text) in self.hidden

    async def open(self, dn: str | None, password: str) -> UpstreamLDAP:
        return await open_upstream(
            self.reactor, self.endpoint, self.start_tls, dn, password, self.config.timeout
        )


@implementer(IHandshakeListener)
class LDAPServer(ListenerConnection, Protocol):
    def __init__(self, listener: LDAPListener) -> None:
        self.listener = listener
        self.config = listener.config
        self.framer = ber.Framer(self.config.max_message_size_before_bind, self.config.max_ber_depth)
        self.tls = False
        self.address = "unknown"
        self.decision: Decision | None = None  # the current identity
        self.anonymous = False
        self.bound = False  # a bind succeeded: relaying is allowed
        self.upstream: UpstreamLDAP | None = None
        self._wanted: str | None = None  # whom the directory must see the session as
        self._lazy = True
        self._preparing = False
        self._pending: list[tuple[ber.Message, bytes]] = []
        self._upstream_lock = DeferredLock()
        self.reading: ReadControl | None = None
        self._binding = False
        self._queued: deque[bytes] = deque()
        self._closing = False
        self._timer: Any = None
        self._counted = False
        self._tls_epoch = 0

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        self.tls = self.config.tls == "implicit"
        if not self._enter(ber.notice_of_disconnection(ber.BUSY, "too many connections")):
            log.info("{address}: too many connections to {listener}", address=self.address,
                     listener=self.config.label)
            return
        if not self.tls:
            control_reading(self)
        self._arm(self.config.login_timeout)

    def connectionLost(self, reason: Any = None) -> None:
        self._leave()
        self._drop_identity()
        self._close_upstream()

    def _arm(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.listener.reactor.callLater(seconds, self._idle)

    def _past_login(self) -> bool:
        return self.bound

    def _idle(self) -> None:
        self.disconnect(ber.UNAVAILABLE, "idle for too long")

    def disconnect(self, code: int, text: str) -> None:
        """Notice of disconnection (RFC 4511 4.4.1), then close."""
        if self._closing:
            return
        self.transport.write(ber.notice_of_disconnection(code, text))
        self._hang_up()
        self._drop_identity()
        self._close_upstream()

    def revoke(self, reason: str) -> None:
        """The session registry ends this session."""
        log.info("{address}: ending the session of {user}: {reason}", address=self.address,
                 user=self.username, reason=reason)
        self.disconnect(ber.UNAVAILABLE, "the session's credentials are no longer valid")

    # -- client → proxy -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._touch()
        try:
            frames = self.framer.feed(data)
        except ber.BERError as e:
            log.info("{address}: malformed LDAP: {error}", address=self.address, error=str(e))
            self.disconnect(ber.PROTOCOL_ERROR, "malformed message")
            return
        if self.decision is None and not self._within_budget(self.framer.buffered):
            self.disconnect(ber.BUSY, "too busy, try again later")
            return
        epoch = self._tls_epoch
        for frame in frames:
            if self._closing or self._tls_epoch != epoch:
                return  # closed, or TLS began: the rest was sent in the clear
            if self._binding:
                self._queued.append(frame)
            else:
                self._frame(frame)

    def _frame(self, frame: bytes) -> None:
        try:
            message = ber.parse_message(frame)
        except ber.BERError as e:
            log.info("{address}: malformed LDAP: {error}", address=self.address, error=str(e))
            self.disconnect(ber.PROTOCOL_ERROR, "malformed message")
            return
        if message.id in (0, OWN_ID):
            # 0 is the server's own (RFC 4511 4.4); OWN_ID is the proxy's.
            self.disconnect(ber.PROTOCOL_ERROR, "message id not allowed")
            return
        tag = message.op_tag
        if tag == ber.BIND_REQUEST:
            self._binding = True
            Deferred.fromCoroutine(self._bind(message)).addErrback(self._crashed)
            if self._binding:
                # Decided later (cache hits are decided at once): stop reading
                # until then.
                self._hold("bind")
        elif tag == ber.UNBIND_REQUEST:
            self._hang_up()
            self._drop_identity()
            self._close_upstream()
        elif tag == ber.EXTENDED_REQUEST:
            self._extended(message, frame)
        elif tag == ber.ABANDON_REQUEST:
            if self.upstream is not None:
                self.upstream.send(frame)
        elif tag in ber.RESPONSE_TAG:
            self._operation(message, frame)
        else:
            self.disconnect(ber.PROTOCOL_ERROR, "unknown operation")

    def _answer(self, message: ber.Message, code: int, text: str = "") -> None:
        tag = ber.RESPONSE_TAG.get(message.op_tag, ber.EXTENDED_RESPONSE)
        self.transport.write(ber.result(message.id, tag, code, text))

    def _operation(self, message: ber.Message, frame: bytes) -> None:
        if not self.bound:
            self._answer(message, ber.OPERATIONS_ERROR, "a successful bind is needed first")
        elif message.op_tag in ber.WRITE_REQUESTS and self._read_only():
            self._answer(message, ber.INSUFFICIENT_ACCESS_RIGHTS,
                         "sessions opened with an app password are read-only")
        elif self._app_password_session():
            self._read_as_user(message)
        else:
            self._to_upstream(message, frame)

    def _app_password_session(self) -> bool:
        return self.decision is not None and self.decision.read_only

    def _read_as_user(self, message: ber.Message) -> None:
        """An app-password session's request: never with more rights than
        its user. Proxied authorization of the client's own would act with
        the reading account's right to act for others: refused."""
        try:
            controls = ber.control_types(message)
            compared = (ber.compared_attribute(message)
                        if message.op_tag == ber.COMPARE_REQUEST else None)
        except ber.BERError:
            self.disconnect(ber.PROTOCOL_ERROR, "malformed request")
            return
        if ber.PROXIED_AUTHORIZATION in controls or ber.PROXIED_AUTHORIZATION_V1 in controls:
            self._answer(message, ber.AUTHORIZATION_DENIED, "proxied authorization is not allowed")
            return
        if any(c not in APP_PASSWORD_CONTROLS for c in controls):
            self._answer(message, ber.UNAVAILABLE_CRITICAL_EXTENSION,
                         "that control is not available to sessions opened with an app password")
            return
        if compared in PASSWORD_ATTRIBUTES:
            # A compare of a password is a password check, past the throttle.
            self._answer(message, ber.INSUFFICIENT_ACCESS_RIGHTS,
                         "sessions opened with an app password cannot check passwords")
            return
        frame = message.frame
        if self.listener.upstream.proxied:
            frame = ber.with_control(message, ber.PROXIED_AUTHORIZATION, b"dn:" + self.dn.encode())
        self._to_upstream(message, frame)

    def _read_only(self) -> bool:
        return self.anonymous or (self.decision is not None and self.decision.read_only)

    def _extended(self, message: ber.Message, frame: bytes) -> None:
        try:
            request = ber.parse_extended(message)
        except ber.BERError:
            self.disconnect(ber.PROTOCOL_ERROR, "malformed extended request")
            return
        if request.name == ber.START_TLS:
            self._start_tls(message)
        elif request.name == ber.WHO_AM_I:
            identity = b"dn:" + self.dn.encode() if self.decision is not None else b""
            self.transport.write(ber.extended_response(message.id, ber.SUCCESS, value=identity))
        elif self.bound and not self._read_only():
            self._to_upstream(message, frame)
        elif self.bound:
            self._answer(message, ber.INSUFFICIENT_ACCESS_RIGHTS,
                         "sessions opened with an app password are read-only")
        else:
            self._answer(message, ber.OPERATIONS_ERROR, "a successful bind is needed first")

    def _start_tls(self, message: ber.Message) -> None:
        if self.tls:
            self._answer(message, ber.OPERATIONS_ERROR, "TLS is already in use")
        elif self.listener.tls is None or self.config.tls != "starttls":
            self._answer(message, ber.PROTOCOL_ERROR, "StartTLS is not offered here")
        elif self.bound or self.upstream is not None or self._queued:
            self._answer(message, ber.OPERATIONS_ERROR, "StartTLS must come before a bind")
        else:
            self._answer(message, ber.SUCCESS)
            stop_controlling_reading(self)
            self.transport.startTLS(self.listener.tls)
            self.tls = True
            # Whatever the client sent after the request, in the clear, is
            # dropped unread: nothing sent before TLS is acted on after it.
            self.framer = ber.Framer(self.framer.max_size, self.config.max_ber_depth)
            self._queued.clear()
            self._tls_epoch += 1

    # -- bind ----------------------------------------------------------------------------

    async def _bind(self, message: ber.Message) -> None:
        try:
            code, text = await self._bind_result(message)
        finally:
            self._binding = False
            self._release("bind")
        if self._closing:
            return
        self.transport.write(ber.result(message.id, ber.BIND_RESPONSE, code, text))
        while self._queued and not self._binding and not self._closing:
            self._frame(self._queued.popleft())

    async def _bind_result(self, message: ber.Message) -> tuple[int, str]:
        # A new bind first drops the old identity; a failed one leaves the
        # connection anonymous (RFC 4511 4.2.1).
        self._drop_identity()
        try:
            bind = ber.parse_bind(message)
        except ber.BERError:
            return ber.PROTOCOL_ERROR, "malformed bind request"
        if bind.version != 3:
            return ber.PROTOCOL_ERROR, "only LDAP version 3 is supported"
        if bind.password is None:
            return ber.AUTH_METHOD_NOT_SUPPORTED, "only simple binds are supported"
        if not bind.name and not bind.password:
            return await self._anonymous()
        if not bind.password:
            # RFC 4513 5.1.2: an unauthenticated bind; never passed on.
            return ber.UNWILLING_TO_PERFORM, "unauthenticated binds are not allowed"
        name = bind.name.decode("utf-8", "replace")
        # The password's bytes reach the directory unchanged, even if not UTF-8.
        password = bind.password.decode("utf-8", "surrogateescape")
        decision = await self.listener.authenticator.authenticate(self._attempt(name, password))
        if decision.reason is Reason.PLAINTEXT:
            return ber.CONFIDENTIALITY_REQUIRED, "use StartTLS or LDAPS"
        if decision.outcome is Outcome.TEMPORARY_FAILURE:
            if decision.reason is Reason.BUSY:
                return ber.BUSY, "try again later"
            return ber.UNAVAILABLE, "try again later"
        if not decision.accepted:
            return ber.INVALID_CREDENTIALS, ""
        assert decision.account is not None
        if decision.read_only:
            # App passwords: the directory is asked as the reader (see
            # directory.app_password_reads), and only when the session first
            # needs it.
            wanted = self.listener.upstream.reader
        else:
            wanted = decision.account.dn
            try:
                await self._connect_as(wanted, password)
            except UpstreamRefused:
                log.warn("{address}: the directory refused the session's bind for {user}",
                         address=self.address, user=decision.username)
                return ber.UNAVAILABLE, "try again later"
            except Exception as e:
                log.warn("{address}: cannot reach the directory: {error}", address=self.address,
                         error=str(e) or type(e).__name__)
                return ber.UNAVAILABLE, "try again later"
        if self._closing:
            return ber.UNAVAILABLE, ""
        if not self.listener.sessions.still_valid(decision):
            return ber.INVALID_CREDENTIALS, ""  # revoked while the bind was under way
        self._become(decision, wanted, lazy=decision.read_only)
        return ber.SUCCESS, ""

    def _attempt(self, name: str, password: str) -> Attempt:
        return Attempt(
            protocol="ldap",
            realm=self.config.realm,
            username=name,
            secret=password,
            client_address=self.address,
            tls=self.tls,
            plaintext_allowed=self.config.allow_plaintext_auth,
            anonymous_allowed=self.config.allow_anonymous,
        )

    async def _anonymous(self) -> tuple[int, str]:
        if not self.listener.authenticator.anonymous(self._attempt("", "")).accepted:
            return ber.INAPPROPRIATE_AUTHENTICATION, "anonymous binds are not allowed"
        self.anonymous = True
        self._bound_as(None, lazy=True)
        return ber.SUCCESS, ""

    def _become(self, decision: Decision, wanted: str, lazy: bool) -> None:
        self.decision = decision
        self._signed_in(decision)
        self._bound_as(wanted, lazy)

    def _bound_as(self, wanted: str | None, lazy: bool) -> None:
        self.bound = True
        self._wanted = wanted
        # Lazy: the proxy may (re)bind the directory connection by itself, as
        # the service account or anonymously. A primary-password session's
        # connection is bound with the user's password once, at the bind.
        self._lazy = lazy
        if self.decision is not None:  # anonymous sessions keep the limits before a bind
            self.framer.max_size = self.config.max_message_size
        self._arm(self.config.idle_timeout)

    def _drop_identity(self) -> None:
        """Forget who the client is. The connection to the directory stays
        open for the next identity (it is re-bound before it is used)."""
        if self.decision is not None:
            self.listener.sessions.remove(self)
            if not self._closing and not self.listener.budget.admit(self):
                # Back among the connections not signed in, if there is room.
                self.decision = None
                self.disconnect(ber.BUSY, "too busy, try again later")
                return
        was_bound, self.decision = self.bound, None
        self.bound = False
        self.anonymous = False
        self.username = self.dn = ""
        self.app_password_id = None
        self.framer.max_size = self.config.max_message_size_before_bind
        if was_bound and not self._closing and self.transport is not None:
            # A new deadline to bind again; failed binds do not extend it.
            self._arm(self.config.login_timeout)

    def _close_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.on_frame = None
            upstream.on_lost = None
            upstream.close()
            self._read_on_our_own()

    def _read_on_our_own(self) -> None:
        """Back to ReadControl once no directory connection paces the client."""
        if self.transport is None or self._closing:
            return
        self.transport.unregisterProducer()
        self.transport.resumeProducing()
        control_reading(self)

    def handshakeCompleted(self) -> None:
        if self.reading is None and self.upstream is None and not self._closing:
            control_reading(self)

    def _hold(self, reason: str) -> None:
        if self.reading is not None:
            self.reading.hold(reason)

    def _release(self, reason: str) -> None:
        if self.reading is not None:
            self.reading.release(reason)

    # -- the session's connection to the directory -------------------------------------

    def _to_upstream(self, message: ber.Message, frame: bytes) -> None:
        upstream = self.upstream
        if (upstream is not None and not upstream.closed and not self._preparing
                and upstream.bound_as == self._wanted):
            upstream.send(frame)
            return
        if not self._lazy:
            # A primary-password session lost its bound connection: the proxy
            # does not keep the password to bind again.
            self.disconnect(ber.UNAVAILABLE, "the directory closed the connection")
            return
        self._pending.append((message, frame))
        if not self._preparing:
            self._preparing = True
            self._hold("upstream")
            Deferred.fromCoroutine(self._prepare_upstream()).addErrback(self._crashed)

    async def _prepare_upstream(self) -> None:
        wanted = self._wanted
        assert wanted is None or wanted == self.listener.upstream.reader
        password = self.listener.upstream.reader_password if wanted is not None else ""
        try:
            await self._connect_as(wanted, password)
        except Exception as e:
            log.warn("{address}: cannot reach the directory: {error}", address=self.address,
                     error=str(e) or type(e).__name__)
            pending, self._pending = self._pending, []
            for message, _ in pending:
                self._answer(message, ber.UNAVAILABLE, "the directory cannot be reached")
            return
        finally:
            self._preparing = False
            self._release("upstream")
        pending, self._pending = self._pending, []
        for message, frame in pending:
            if self.bound and self._wanted == wanted and self.upstream is not None:
                self.upstream.send(frame)
            else:
                self._answer(message, ber.OPERATIONS_ERROR, "a successful bind is needed first")

    async def _connect_as(self, dn: str | None, password: str) -> None:
        """A connection to the directory bound as ``dn`` (None: anonymous):
        the one the session has, re-bound if need be, or a new one. One at a
        time: a bind never races a lazy connect."""
        await self._upstream_lock.acquire()
        try:
            await self._connect_as_locked(dn, password)
        finally:
            self._upstream_lock.release()

    async def _connect_as_locked(self, dn: str | None, password: str) -> None:
        upstream = self.upstream
        timeout = self.listener.upstream.config.timeout
        if upstream is not None and not upstream.closed:
            if upstream.bound_as != dn:
                await upstream.bind(dn, password, self.listener.reactor, timeout)
            return
        upstream = await self.listener.upstream.open(dn, password)
        upstream.bound_as = dn
        if self._closing or self.upstream is not None:
            upstream.close()
            return
        self.upstream = upstream
        upstream.on_frame = self._from_upstream
        upstream.on_lost = self._upstream_lost
        # Flow control both ways: a slow reader pauses the other side.
        stop_controlling_reading(self)
        self.transport.registerProducer(upstream.transport, True)
        upstream.transport.registerProducer(self.transport, True)

    # -- proxy ← directory --------------------------------------------------------------

    def _from_upstream(self, frame: bytes) -> None:
        self._touch()
        if self._app_password_session():
            frame = readable_by_app_password(frame, self.listener.upstream)
            if not frame:
                return  # the reading account's own entry
        self.transport.write(frame)

    def _upstream_lost(self) -> None:
        self.upstream = None
        self._read_on_our_own()
        if self.bound:
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


# Attributes that hold a primary password or its hash. A device's app
# password must not be a way to the user's primary password, not even to a
# hash to crack offline: app-password sessions never see them.
PASSWORD_ATTRIBUTES = frozenset({
    b"userpassword", b"authpassword", b"unicodepwd", b"sambantpassword", b"sambalmpassword",
    b"ntpassword", b"lmpassword", b"krbprincipalkey",
    # the same by their OIDs (an attribute may be named either way)
    b"2.5.4.35", b"1.3.6.1.4.1.4203.1.3.4", b"1.2.840.113556.1.4.90",
    b"1.3.6.1.4.1.7165.2.1.25", b"1.3.6.1.4.1.7165.2.1.24", b"2.16.840.1.113719.1.301.4.2.1",
})
# Request controls an app-password session may use: paging, sorting, and
# manageDsaIT. Others may read more than the entries do (dereference, for
# one, returns attributes of other entries inside a control).
APP_PASSWORD_CONTROLS = frozenset({
    "1.2.840.113556.1.4.319",  # simple paged results (RFC 2696)
    "1.2.840.113556.1.4.473",  # server-side sorting (RFC 2891)
    "2.16.840.1.113730.3.4.2",  # manageDsaIT (RFC 3296)
})


def readable_by_app_password(frame: bytes, upstream: Upstream) -> bytes:
    """What an app-password session may see of a message from the
    directory: search results without password attributes, and nothing
    (b"") of the reading account's own entry."""
    try:
        message = ber.parse_message(frame)
        if message.op_tag != ber.SEARCH_RESULT_ENTRY:
            return frame
        if upstream.is_hidden(ber.entry_name(message)):
            return b""
        return ber.without_attributes(message, PASSWORD_ATTRIBUTES) or frame
    except ber.BERError:
        return b""  # nothing unreadable reaches the client
