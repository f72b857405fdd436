"""The POP3 front end: legacy mail clients sign in, the core decides, and the
session is relayed to the real POP3 server, logged in as the user.

:class:`PreLogin` is the AUTHORIZATION state of RFC 1939 as a state machine
that does no I/O: USER and PASS, AUTH with PLAIN and LOGIN (RFC 5034, with
an initial response), CAPA (RFC 2449), STLS (RFC 2595) and QUIT. Failures
carry RFC 3206's response codes: ``[AUTH]`` for a refusal, ``[SYS/TEMP]``
for "try again later". Written by hand for the same reason as the IMAP and
SMTP dialogues: the stock ``twisted.mail.pop3`` executes what a client
pipelined behind STLS.
"""

from __future__ import annotations

from typing import Any

from proxy.frontends.base import (
    Event,
    LineDialogue,
    Listener,
    Login,
    RelayingServer,
    Send,
    StartTLS,
    login_event,
)
from proxy.wire import sasl
from proxy.wire.lines import LineReader

SERVER_NAME = "legacy-auth-proxy"
# What Dovecot offers after login; a client reads CAPA before it.
SESSION_CAPABILITIES = (b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE")


class PreLogin(LineDialogue):
    """The POP3 dialogue up to a successful login. No I/O."""

    def __init__(
        self,
        *,
        tls: bool,
        starttls: bool,
        allow_plaintext: bool,
        max_line: int = 8192,
        max_bad: int = 3,
        bearer: bool = False,
    ) -> None:
        super().__init__(tls=tls, starttls=starttls, allow_plaintext=allow_plaintext,
                         max_bad=max_bad, reader=LineReader(max_line), bearer=bearer)
        self._user: bytes | None = None  # USER's argument, waiting for PASS
        self._sasl: sasl.Exchange | None = None

    def greeting(self) -> bytes:
        return b"+OK " + SERVER_NAME.encode() + b" ready.\r\n"

    # -- replies --------------------------------------------------------------------

    @staticmethod
    def _ok(text: bytes) -> Send:
        return Send(b"+OK " + text + b"\r\n")

    def _err(self, text: bytes) -> list[Event]:
        events: list[Event] = [Send(b"-ERR " + text + b"\r\n")]
        if self._one_more_bad():
            events += self._close(b"-ERR Too many bad commands.")
        return events

    def _capabilities(self) -> bytes:
        lines = [b"CAPA", *SESSION_CAPABILITIES]
        if self.starttls and not self.tls:
            lines.append(b"STLS")
        if self.can_login:
            lines += [b"USER", b"SASL " + " ".join(self.mechanisms).encode()]
        lines.append(b"IMPLEMENTATION " + SERVER_NAME.encode())
        return b"+OK Capability list follows.\r\n" + b"".join(l + b"\r\n" for l in lines) + b".\r\n"

    # -- input ------------------------------------------------------------------------

    def _bad_characters(self) -> list[Event]:
        return self._err(b"Bad characters in command.")

    def _too_long(self) -> list[Event]:
        return self._close(b"-ERR Line too long.")

    def _command(self, line: bytes) -> list[Event]:
        verb, _, rest = line.partition(b" ")
        verb = verb.upper()
        if verb not in (b"USER", b"PASS"):
            self._user = None
        if verb == b"CAPA":
            return [Send(self._capabilities())]
        if verb == b"QUIT":
            return self._close(b"+OK Logging out.")
        if verb == b"STLS":
            if self.tls or not self.starttls:
                return self._err(b"TLS is already active." if self.tls else b"STLS is not offered.")
            # Whatever followed in the clear is dropped unread.
            self.reader.take_rest()
            self.tls = True
            self.bad = 0
            return [self._ok(b"Begin TLS negotiation now."), StartTLS()]
        if verb in (b"USER", b"PASS", b"AUTH") and not self.can_login:
            # Not offered here: no password is asked for in the clear; the
            # core refuses the sign-in (and audits it).
            self.deciding = True
            return [login_event(b"", sasl.Credentials(b"", b"", "user"))]
        if verb == b"USER":
            if not rest.strip():
                return self._err(b"USER needs a name.")
            self._user = rest.strip()
            return [self._ok(b"Send your password.")]
        if verb == b"PASS":
            user, self._user = self._user, None
            if user is None:
                return self._err(b"USER first.")
            # The password is the rest of the line, spaces included.
            self.deciding = True
            return [login_event(b"", sasl.Credentials(user, rest, "user"))]
        if verb == b"AUTH":
            return self._auth(rest.split())
        return self._err(b"Unknown command or not allowed before login.")

    # -- SASL ----------------------------------------------------------------------------

    def _auth(self, args: list[bytes]) -> list[Event]:
        if not args:
            mechanisms = b"".join(m.encode() + b"\r\n" for m in self.mechanisms)
            return [Send(b"+OK\r\n" + mechanisms + b".\r\n")]
        if len(args) > 2:
            return self._err(b"Syntax: AUTH mechanism [initial-response]")
        mechanism = args[0].upper().decode("ascii", "replace")
        if mechanism not in self.mechanisms:
            return self._err(b"Unsupported authentication mechanism.")
        self._sasl = sasl.Exchange(mechanism)
        return self._sasl_step(self._sasl.start(args[1] if len(args) == 2 else None))

    def _sasl_step(self, step: sasl.Step) -> list[Event]:
        if isinstance(step, sasl.Challenge):
            return [Send(b"+ " + step.data + b"\r\n")]
        self._sasl = None
        if isinstance(step, sasl.Failed):
            return self._err(step.reason.encode())
        self.deciding = True
        return [login_event(b"", step)]

    # -- after a login was decided --------------------------------------------------------

    def login_failed(self, tag: bytes, temporary: bool, plaintext: bool = False) -> list[Event]:
        self.deciding = False
        if plaintext:
            return self._err(b"[AUTH] Plaintext authentication disallowed on non-secure "
                             b"(SSL/TLS) connections.") + self._run()
        if temporary:
            answer = b"-ERR [SYS/TEMP] Temporary authentication failure, try again later.\r\n"
        else:
            answer = b"-ERR [AUTH] Authentication failed.\r\n"
        return [Send(answer)] + self._run()

# -- the protocol -------------------------------------------------------------------------


class POP3Server(RelayingServer):
    protocol_name = "pop3"

    def make_machine(self) -> PreLogin:
        return PreLogin(**self.machine_settings(bad_commands=3))

    def bye(self, text: str) -> bytes:
        return b"-ERR [SYS/TEMP] " + text.encode() + b"\r\n"

    def backend_said_goodbye(self, last: bytes) -> bool:
        # After QUIT, "+OK Logging out."; when it gives up on a client, -ERR.
        line = last.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
        return line.startswith(b"-ERR") or b"logging out" in line.lower() or \
            line.lower().startswith(b"+ok bye")

    def logged_in(self, event: Login, backend: Any) -> bytes:
        return b"+OK Logged in.\r\n"


class POP3Listener(Listener):
    server = POP3Server
