"""The IMAP front end: legacy mail clients sign in, the core decides, and the
session is relayed to the real IMAP server, logged in as the user.

:class:`PreLogin` is the pre-login dialogue as a state machine that does no
I/O: bytes in, events out (bytes to send, start TLS, a login to decide,
close). :class:`IMAPServer` is the Protocol that runs it, asks the
Authenticator, logs in to the backend and then relays bytes both ways.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from proxy.apppasswords import canonical_username
from proxy.auth import Attempt, Outcome
from proxy.config import ListenerConfig
from proxy.frontends import imapwire
from proxy.frontends.imapwire import Command, CommandError, Literal, TooLong

log = Logger(namespace="legacy_auth_proxy.frontends.imap")

SERVER_NAME = "legacy-auth-proxy"


# -- the pre-login state machine ------------------------------------------------------


@attrs.frozen
class Send:
    data: bytes


@attrs.frozen
class StartTLS:
    """The OK has been sent: start TLS now, before reading anything else."""


@attrs.frozen
class Login:
    tag: bytes
    username: str
    secret: str = attrs.field(repr=False)
    mechanism: str


@attrs.frozen
class Close:
    pass


Event = Send | StartTLS | Login | Close


class PreLogin:
    """The IMAP dialogue up to a successful login. No I/O.

    Offers CAPABILITY, NOOP, LOGOUT, STARTTLS, ID, LOGIN and AUTHENTICATE
    (PLAIN with SASL-IR, LOGIN). Anything else is answered BAD; after
    ``max_bad`` bad commands the client is told BYE and the connection
    closed. While a login is being decided nothing more is read; after a
    successful one, :meth:`take_rest` gives the bytes the client pipelined
    behind it, for the backend.
    """

    def __init__(
        self,
        *,
        tls: bool,
        starttls: bool,
        allow_plaintext: bool,
        max_line: int = 8192,
        max_literal: int = 4096,
        max_bad: int = 3,
    ) -> None:
        self.tls = tls
        self.starttls = starttls
        self.allow_plaintext = allow_plaintext
        self.max_bad = max_bad
        self.bad = 0
        self.reader = imapwire.Reader(max_line, max_literal)
        self.closed = False
        self.deciding = False
        self._sasl: tuple[bytes, str, list[bytes]] | None = None  # tag, mechanism, answers

    # -- what the client is told ------------------------------------------------

    @property
    def can_login(self) -> bool:
        return self.tls or self.allow_plaintext

    def capabilities(self) -> bytes:
        caps = [b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID"]
        if self.starttls and not self.tls:
            caps.append(b"STARTTLS")
        if self.can_login:
            caps += [b"AUTH=PLAIN", b"AUTH=LOGIN"]
        else:
            caps.append(b"LOGINDISABLED")
        return b" ".join(caps)

    def greeting(self) -> bytes:
        return b"* OK [CAPABILITY " + self.capabilities() + b"] " + SERVER_NAME.encode() + b" ready.\r\n"

    # -- input --------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        if self.closed:
            return []
        self.reader.buffer += data
        return self._run()

    def _run(self) -> list[Event]:
        events: list[Event] = []
        try:
            while not self.closed and not self.deciding:
                if self._sasl is not None:
                    line = self.reader.line()
                    if line is None:
                        break
                    events += self._sasl_answer(line)
                    continue
                try:
                    item = self.reader.next()
                except CommandError as e:
                    events += self._bad(b"*", str(e))
                    continue
                if item is None:
                    break
                if isinstance(item, Literal):
                    events.append(Send(b"+ Ready for literal data\r\n"))
                    continue
                try:
                    command = imapwire.parse(item)
                except CommandError as e:
                    events += self._bad(imapwire.tag_of(item[0]), str(e))
                    continue
                events += self._command(command)
                if any(isinstance(e, StartTLS) for e in events):
                    break
        except TooLong as e:
            events += self._bye(f"{e}.")
        return events

    def _bad(self, tag: bytes, text: str) -> list[Event]:
        self.bad += 1
        events: list[Event] = [Send(tag + b" BAD " + text.encode() + b"\r\n")]
        if self.bad >= self.max_bad:
            events += self._bye("Too many invalid commands.")
        return events

    def _bye(self, text: str) -> list[Event]:
        self.closed = True
        return [Send(b"* BYE " + text.encode() + b"\r\n"), Close()]

    @staticmethod
    def _ok(tag: bytes, text: bytes) -> Send:
        return Send(tag + b" OK " + text + b"\r\n")

    def _command(self, command: Command) -> list[Event]:
        tag, name, args = command.tag, command.name, command.args
        if name == b"CAPABILITY" and not args:
            return [Send(b"* CAPABILITY " + self.capabilities() + b"\r\n"),
                    self._ok(tag, b"Capability completed.")]
        if name == b"NOOP" and not args:
            return [self._ok(tag, b"NOOP completed.")]
        if name == b"LOGOUT" and not args:
            self.closed = True
            return [Send(b"* BYE Logging out.\r\n"), self._ok(tag, b"Logout completed."), Close()]
        if name == b"ID" and len(args) == 1:
            return [Send(b'* ID ("name" "' + SERVER_NAME.encode() + b'")\r\n'),
                    self._ok(tag, b"ID completed.")]
        if name == b"STARTTLS" and not args:
            if self.tls or not self.starttls:
                return self._bad(tag, "TLS is already active." if self.tls else "STARTTLS is not offered.")
            # Whatever followed STARTTLS in the clear is dropped unread, and
            # nothing said before TLS is remembered after it.
            self.reader.take_rest()
            self.tls = True
            self.bad = 0
            return [self._ok(tag, b"Begin TLS negotiation now."), StartTLS()]
        if name == b"LOGIN" and len(args) == 2 and all(isinstance(a, bytes) for a in args):
            if not self.can_login:
                return [Send(tag + b" NO [PRIVACYREQUIRED] Use STARTTLS first.\r\n")]
            return [self._login(tag, args[0], args[1], "login")]  # type: ignore[arg-type]
        if name == b"AUTHENTICATE" and 1 <= len(args) <= 2 and all(isinstance(a, bytes) for a in args):
            return self._authenticate(tag, args)  # type: ignore[arg-type]
        if name in (b"LOGIN", b"AUTHENTICATE", b"CAPABILITY", b"NOOP", b"LOGOUT", b"ID", b"STARTTLS"):
            return self._bad(tag, "Invalid arguments.")
        return self._bad(tag, "Unknown command or not allowed before login.")

    def _login(self, tag: bytes, user: bytes, secret: bytes, mechanism: str) -> Login:
        self.deciding = True
        return Login(tag, user.decode("utf-8", "replace"), secret.decode("utf-8", "replace"), mechanism)

    # -- SASL ----------------------------------------------------------------------

    def _authenticate(self, tag: bytes, args: tuple[bytes, ...]) -> list[Event]:
        if not self.can_login:
            return [Send(tag + b" NO [PRIVACYREQUIRED] Use STARTTLS first.\r\n")]
        mechanism = args[0].upper().decode("ascii", "replace")
        if mechanism not in ("PLAIN", "LOGIN"):
            return [Send(tag + b" NO Unsupported authentication mechanism.\r\n")]
        self._sasl = (tag, mechanism, [])
        if len(args) == 2:  # SASL-IR (RFC 4959): "=" is an empty initial response
            return self._sasl_answer(b"" if args[1] == b"=" else args[1], initial=True)
        return [Send(b"+ \r\n" if mechanism == "PLAIN" else b"+ VXNlcm5hbWU6\r\n")]

    def _sasl_answer(self, line: bytes, initial: bool = False) -> list[Event]:
        assert self._sasl is not None
        tag, mechanism, answers = self._sasl
        if line == b"*" and not initial:
            self._sasl = None
            return self._bad(tag, "Authentication cancelled.")
        try:
            decoded = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._sasl = None
            return self._bad(tag, "Invalid base64 data.")
        answers.append(decoded)
        if mechanism == "LOGIN":
            if len(answers) == 1:
                return [Send(b"+ UGFzc3dvcmQ6\r\n")]
            self._sasl = None
            return [self._login(tag, answers[0], answers[1], "login")]
        self._sasl = None
        parts = decoded.split(b"\x00")
        if len(parts) != 3:
            return self._bad(tag, "Invalid PLAIN message.")
        authzid, authcid, secret = parts
        if authzid and canonical_username(authzid.decode("utf-8", "replace")) != canonical_username(
            authcid.decode("utf-8", "replace")
        ):
            return [Send(tag + b" NO [AUTHORIZATIONFAILED] Authorization identity not allowed.\r\n")]
        return [self._login(tag, authcid, secret, "plain")]

    # -- after a login was decided ----------------------------------------------------

    def login_failed(self, tag: bytes, temporary: bool) -> list[Event]:
        """The login was refused: answer, and go on with what is buffered."""
        self.deciding = False
        if temporary:
            answer = b" NO [UNAVAILABLE] Temporary authentication failure, try again later.\r\n"
        else:
            answer = b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        return [Send(tag + answer)] + self._run()

    def take_rest(self) -> bytes:
        """After a successful login: the bytes pipelined behind it."""
        self.closed = True
        return self.reader.take_rest()


# -- the protocol -------------------------------------------------------------------------


class IMAPListener(Factory):
    def __init__(self, *, reactor: Any, config: ListenerConfig, authenticator: Any,
                 sessions: Any, backend: Any, tls: Any | None) -> None:
        self.reactor = reactor
        self.config = config
        self.authenticator = authenticator
        self.sessions = sessions
        self.backend = backend
        self.tls = tls
        self.per_source: dict[str, int] = {}
        self.connections: set[IMAPServer] = set()

    def buildProtocol(self, addr: Any) -> IMAPServer:
        protocol = IMAPServer(self)
        protocol.factory = self
        return protocol


class IMAPServer(Protocol):
    def __init__(self, listener: IMAPListener) -> None:
        self.listener = listener
        self.config = listener.config
        self.address = "unknown"
        self.port = 0
        self.machine: PreLogin | None = None
        self.backend: Any = None
        self._timer: Any = None
        self._counted = False
        self._closing = False
        self.username = ""
        self.dn = ""
        self.app_password_id: str | None = None
        self._registered = False

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.address = getattr(peer, "host", None) or "unix"
        self.port = getattr(peer, "port", 0) or 0
        count = self.listener.per_source.get(self.address, 0)
        if count >= self.config.max_connections_per_source:
            self._closing = True
            self.transport.write(b"* BYE Too many connections from your address.\r\n")
            self.transport.loseConnection()
            return
        self.listener.per_source[self.address] = count + 1
        self._counted = True
        self.listener.connections.add(self)
        self.machine = PreLogin(
            tls=self.config.tls == "implicit",
            starttls=self.config.tls == "starttls" and self.listener.tls is not None,
            allow_plaintext=self.config.allow_plaintext_auth,
            max_line=self.config.max_line_length,
            max_literal=self.config.max_literal_size,
            max_bad=self.config.max_bad_commands,
        )
        self.transport.write(self.machine.greeting())
        self._timer = self.listener.reactor.callLater(self.config.login_timeout, self._idle)

    def connectionLost(self, reason: Any = None) -> None:
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._counted:
            left = self.listener.per_source[self.address] - 1
            if left:
                self.listener.per_source[self.address] = left
            else:
                del self.listener.per_source[self.address]
            self._counted = False
        self.listener.connections.discard(self)
        if self._registered:
            self.listener.sessions.remove(self)
            self._registered = False
        if self.backend is not None:
            self.backend.close()

    def _touch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.config.idle_timeout if self.backend else self.config.login_timeout)

    def _idle(self) -> None:
        self.close(b"* BYE Idle for too long.\r\n")

    def close(self, bye: bytes) -> None:
        if self._closing:
            return
        self._closing = True
        if self.backend is not None:
            # Stop relaying first, so that the BYE does not land inside a response.
            self.backend.detach()
            self.backend.close()
        self.transport.write(bye)
        self.transport.loseConnection()

    def revoke(self, reason: str) -> None:
        log.info("{address}: ending the IMAP session of {user}: {reason}", address=self.address,
                 user=self.username, reason=reason)
        self.close(b"* BYE Session ended: its credentials are no longer valid.\r\n")

    # -- client → proxy ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._touch()
        if self.backend is not None:
            self.backend.transport.write(data)
            return
        assert self.machine is not None
        self._run(self.machine.feed(data))

    def _run(self, events: list[Event]) -> None:
        for event in events:
            if self._closing:
                return
            if isinstance(event, Send):
                self.transport.write(event.data)
            elif isinstance(event, StartTLS):
                self.transport.startTLS(self.listener.tls)
            elif isinstance(event, Login):
                Deferred.fromCoroutine(self._login(event)).addErrback(self._crashed)
            elif isinstance(event, Close):
                self._closing = True
                self.transport.loseConnection()

    async def _login(self, event: Login) -> None:
        assert self.machine is not None
        attempt = Attempt(
            protocol="imap",
            realm=self.config.realm,
            username=event.username,
            secret=event.secret,
            client_address=self.address,
            tls=self.machine.tls,
        )
        decision = await self.listener.authenticator.authenticate(attempt)
        if self._closing:
            return
        if not decision.accepted:
            temporary = decision.outcome is Outcome.TEMPORARY_FAILURE
            self._run(self.machine.login_failed(event.tag, temporary))
            return
        try:
            backend = await self.listener.backend.login(
                decision.username, self.address, self.port
            )
        except Exception as e:
            log.warn("{address}: the IMAP backend did not log {user} in: {error}",
                     address=self.address, user=decision.username, error=str(e) or type(e).__name__)
            if not self._closing:
                self._run(self.machine.login_failed(event.tag, temporary=True))
            return
        if self._closing:
            backend.close()
            return
        assert decision.account is not None
        self.username = decision.username
        self.dn = decision.account.dn
        self.app_password_id = decision.app_password.id if decision.app_password else None
        self.listener.sessions.add(self)
        self._registered = True
        rest = self.machine.take_rest()
        self.machine = None
        self.backend = backend
        backend.attach(self)
        self.transport.write(
            event.tag + b" OK [CAPABILITY " + backend.capabilities + b"] Logged in.\r\n"
        )
        self.transport.registerProducer(backend.transport, True)
        backend.transport.registerProducer(self.transport, True)
        self._touch()
        if rest:
            backend.transport.write(rest)

    # -- proxy ← backend ------------------------------------------------------------------

    def from_backend(self, data: bytes) -> None:
        self._touch()
        self.transport.write(data)

    def backend_lost(self) -> None:
        if not self._closing:
            self._closing = True
            self.transport.loseConnection()

    def _crashed(self, failure: Any) -> None:
        log.failure("{address}: an IMAP login failed unexpectedly", failure, address=self.address)
        self.close(b"* BYE Internal error.\r\n")
