"""The IMAP front end: legacy mail clients sign in, the core decides, and the
session is relayed to the real IMAP server, logged in as the user.

:class:`PreLogin` is the pre-login dialogue as a state machine that does no
I/O: bytes in, events out (bytes to send, start TLS, a login to decide,
close). :class:`IMAPServer` adds IMAP's words to
:class:`proxy.frontends.base.RelayingServer`, which runs the machine, asks
the Authenticator, logs in to the backend and relays bytes both ways.
"""

from __future__ import annotations

from typing import Any

from proxy.frontends.base import (
    Close,
    Dialogue,
    Event,
    Listener,
    Login,
    RelayingServer,
    Send,
    StartTLS,
    login_event,
)
from proxy.wire import imap as imapwire
from proxy.wire import sasl
from proxy.wire.imap import Command, CommandError, Literal, TooLong

SERVER_NAME = "legacy-auth-proxy"


# -- the pre-login state machine ------------------------------------------------------


class PreLogin(Dialogue):
    """The IMAP dialogue up to a successful login. No I/O.

    Offers CAPABILITY, NOOP, LOGOUT, STARTTLS, ID, LOGIN and AUTHENTICATE
    (PLAIN with SASL-IR, LOGIN; XOAUTH2 and OAUTHBEARER where the core takes
    access tokens). Anything else is answered BAD; after
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
        bearer: bool = False,
    ) -> None:
        super().__init__(tls=tls, starttls=starttls, allow_plaintext=allow_plaintext,
                         max_bad=max_bad, reader=imapwire.Reader(max_line, max_literal), bearer=bearer)
        self._sasl: tuple[bytes, sasl.Exchange] | None = None  # the command's tag, the exchange

    # -- what the client is told ------------------------------------------------

    def capabilities(self) -> bytes:
        caps = [b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID"]
        if self.starttls and not self.tls:
            caps.append(b"STARTTLS")
        if self.can_login:
            caps += [b"AUTH=" + m.encode() for m in self.mechanisms]
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
                    events += self._bad(e.tag, str(e))
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
        events: list[Event] = [Send(tag + b" BAD " + text.encode() + b"\r\n")]
        if self._one_more_bad():
            events += self._bye("Too many invalid commands.")
        return events

    def _bye(self, text: str) -> list[Event]:
        return self._close(b"* BYE " + text.encode())

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
            # Sent in the clear or not, the core decides whether it may be used.
            return [self._login(tag, sasl.Credentials(args[0], args[1], "login"))]  # type: ignore[arg-type]
        if name == b"AUTHENTICATE" and 1 <= len(args) <= 2 and all(isinstance(a, bytes) for a in args):
            return self._authenticate(tag, args)  # type: ignore[arg-type]
        if name in (b"LOGIN", b"AUTHENTICATE", b"CAPABILITY", b"NOOP", b"LOGOUT", b"ID", b"STARTTLS"):
            return self._bad(tag, "Invalid arguments.")
        return self._bad(tag, "Unknown command or not allowed before login.")

    def _login(self, tag: bytes, credentials: sasl.Credentials) -> Login:
        self.deciding = True
        return login_event(tag, credentials)

    # -- SASL ----------------------------------------------------------------------

    def _authenticate(self, tag: bytes, args: tuple[bytes, ...]) -> list[Event]:
        if not self.can_login:
            # Not offered here: no password is asked for in the clear; the
            # core refuses the sign-in (and audits it).
            return [self._login(tag, sasl.Credentials(b"", b"", "plain"))]
        mechanism = args[0].upper().decode("ascii", "replace")
        if mechanism not in self.mechanisms:
            return [Send(tag + b" NO Unsupported authentication mechanism.\r\n")]
        self._sasl = (tag, sasl.Exchange(mechanism))
        # SASL-IR (RFC 4959): the initial response on the command line.
        return self._sasl_step(self._sasl[1].start(args[1] if len(args) == 2 else None))

    def _sasl_answer(self, line: bytes) -> list[Event]:
        assert self._sasl is not None
        return self._sasl_step(self._sasl[1].answer(line))

    def _sasl_step(self, step: sasl.Step) -> list[Event]:
        assert self._sasl is not None
        tag = self._sasl[0]
        if isinstance(step, sasl.Challenge):
            return [Send(b"+ " + step.data + b"\r\n")]
        self._sasl = None
        if isinstance(step, sasl.Failed):
            return self._bad(tag, step.reason)
        return [self._login(tag, step)]

    # -- after a login was decided ----------------------------------------------------

    def login_failed(self, tag: bytes, temporary: bool, plaintext: bool = False) -> list[Event]:
        """The login was refused: answer, and go on with what is buffered."""
        self.deciding = False
        if plaintext:
            answer = b" NO [PRIVACYREQUIRED] Use STARTTLS first.\r\n"
        elif temporary:
            answer = b" NO [UNAVAILABLE] Temporary authentication failure, try again later.\r\n"
        else:
            answer = b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        return [Send(tag + answer)] + self._run()



# -- the protocol -------------------------------------------------------------------------


class IMAPServer(RelayingServer):
    protocol_name = "imap"

    def make_machine(self) -> PreLogin:
        return PreLogin(**self.machine_settings(bad_commands=3),
                        max_literal=self.config.max_literal_size)

    def bye(self, text: str) -> bytes:
        return b"* BYE " + text.encode() + b"\r\n"

    def backend_said_goodbye(self, last: bytes) -> bool:
        return b"* BYE " in last.upper()

    def logged_in(self, event: Login, backend: Any) -> bytes:
        return event.tag + b" OK [CAPABILITY " + backend.capabilities + b"] Logged in.\r\n"


class IMAPListener(Listener):
    server = IMAPServer
