"""The SMTP submission front end: legacy clients authenticate, the core
decides, and the session is relayed to the real submission server.

:class:`PreAuth` is the dialogue up to a successful AUTH as a state machine
that does no I/O. Written by hand because the stock
``twisted.mail.smtp.ESMTP`` is a LineOnlyReceiver that executes commands
pipelined after STARTTLS. Every reply carries an RFC 3463 enhanced status
code (RFC 4954 section 6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.frontends.base import (
    Close,
    Event,
    Listener,
    Login,
    RelayingServer,
    Send,
    StartTLS,
    ToBackend,
    ToClient,
    login_event,
)
from proxy.wire import sasl
from proxy.wire.lines import LineReader, TooLong
from proxy.wire.smtp import DEFAULT_EXTENSIONS

_SASL_FAILURES = {
    "cancelled": b"501 5.0.0 Authentication cancelled",
    "base64": b"501 5.5.2 Cannot decode response",
    "malformed": b"501 5.5.2 Invalid PLAIN message",
}


class PreAuth:
    """The submission dialogue up to a successful AUTH. No I/O."""

    def __init__(
        self,
        *,
        hostname: str,
        tls: bool,
        starttls: bool,
        allow_plaintext: bool,
        extensions: Sequence[bytes] = DEFAULT_EXTENSIONS,
        max_line: int = 8192,
        max_errors: int = 20,
    ) -> None:
        self.hostname = hostname.encode()
        self.tls = tls
        self.starttls = starttls
        self.allow_plaintext = allow_plaintext
        self.extensions = list(extensions)
        self.max_line = max_line
        self.max_errors = max_errors
        self.errors = 0
        self.helo = False
        self.closed = False
        self.deciding = False
        self.reader = LineReader(max_line)
        self._sasl: sasl.Exchange | None = None

    @property
    def can_login(self) -> bool:
        return self.tls or self.allow_plaintext

    def greeting(self) -> bytes:
        return b"220 " + self.hostname + b" ESMTP ready\r\n"

    # -- replies --------------------------------------------------------------------

    def _reply(self, text: bytes) -> Send:
        return Send(text + b"\r\n")

    def _error(self, text: bytes) -> list[Event]:
        self.errors += 1
        events: list[Event] = [self._reply(text)]
        if self.errors >= self.max_errors:
            events += self._close(b"421 4.7.0 Error: too many errors")
        return events

    def _close(self, text: bytes) -> list[Event]:
        self.closed = True
        return [self._reply(text), Close()]

    def _ehlo(self) -> list[Event]:
        lines = [self.hostname] + list(self.extensions) + [b"ENHANCEDSTATUSCODES"]
        if self.starttls and not self.tls:
            lines.append(b"STARTTLS")
        if self.can_login:
            lines.append(b"AUTH PLAIN LOGIN")
        body = b"".join(b"250-" + line + b"\r\n" for line in lines[:-1])
        return [Send(body + b"250 " + lines[-1] + b"\r\n")]

    # -- input ------------------------------------------------------------------------

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
                if b"\n" in line or b"\r" in line or b"\x00" in line:
                    events += self._error(b"500 5.5.2 Error: bad characters in command")
                elif self._sasl is not None:
                    events += self._sasl_answer(line)
                else:
                    events += self._command(line)
                if any(isinstance(e, StartTLS) for e in events):
                    break
        except TooLong:
            events += self._close(b"500 5.5.0 Error: line too long")
        return events

    def _command(self, line: bytes) -> list[Event]:
        verb, _, rest = line.partition(b" ")
        verb = verb.upper()
        rest = rest.strip()
        if verb == b"EHLO" or verb == b"HELO":
            if not rest:
                return self._error(b"501 5.5.4 Syntax: " + verb + b" hostname")
            self.helo = True
            if verb == b"HELO":
                return [self._reply(b"250 " + self.hostname)]
            return self._ehlo()
        if verb == b"STARTTLS":
            if rest:
                return self._error(b"501 5.5.4 Syntax: STARTTLS")
            if self.tls or not self.starttls:
                return self._error(b"503 5.5.1 Error: TLS already active" if self.tls
                                   else b"502 5.5.1 Error: STARTTLS not offered")
            # Whatever followed in the clear is dropped unread, and the EHLO
            # before TLS is forgotten (RFC 3207 4.2).
            self.reader.take_rest()
            self.tls = True
            self.helo = False
            return [self._reply(b"220 2.0.0 Ready to start TLS"), StartTLS()]
        if verb == b"AUTH":
            return self._auth(rest)
        if verb in (b"MAIL", b"RCPT", b"DATA", b"BDAT", b"VRFY", b"EXPN", b"ETRN"):
            return self._error(b"530 5.7.0 Authentication required")
        if verb == b"NOOP":
            return [self._reply(b"250 2.0.0 OK")]
        if verb == b"RSET":
            return [self._reply(b"250 2.0.0 OK")]
        if verb == b"HELP":
            return [self._reply(b"214 2.0.0 Commands: EHLO HELO STARTTLS AUTH NOOP RSET QUIT HELP")]
        if verb == b"QUIT":
            return self._close(b"221 2.0.0 Bye")
        return self._error(b"500 5.5.2 Error: command not recognized")

    # -- AUTH ----------------------------------------------------------------------------

    def _auth(self, rest: bytes) -> list[Event]:
        if not self.helo:
            return self._error(b"503 5.5.1 Error: send EHLO first")
        if not self.can_login:
            # Not offered here: no password is asked for in the clear; the
            # core refuses the sign-in (and audits it).
            self.deciding = True
            return [login_event(b"", sasl.Credentials(b"", b"", "plain"))]
        parts = rest.split()
        if not 1 <= len(parts) <= 2:
            return self._error(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]")
        mechanism = parts[0].upper().decode("ascii", "replace")
        if mechanism not in sasl.MECHANISMS:
            return self._error(b"504 5.5.4 Unrecognized authentication type")
        self._sasl = sasl.Exchange(mechanism)
        return self._sasl_step(self._sasl.start(parts[1] if len(parts) == 2 else None))

    def _sasl_answer(self, line: bytes) -> list[Event]:
        assert self._sasl is not None
        return self._sasl_step(self._sasl.answer(line))

    def _sasl_step(self, step: sasl.Step) -> list[Event]:
        if isinstance(step, sasl.Challenge):
            return [self._reply(b"334 " + step.data)]
        self._sasl = None
        if isinstance(step, sasl.Failed):
            return self._error(_SASL_FAILURES[step.kind])
        self.deciding = True
        return [login_event(b"", step)]

    def login_failed(self, tag: bytes, temporary: bool, plaintext: bool = False) -> list[Event]:
        self.deciding = False
        if plaintext:
            return self._error(b"530 5.7.0 Must issue a STARTTLS command first") + self._run()
        if temporary:
            return [self._reply(b"454 4.7.0 Temporary authentication failure, try again later")] + self._run()
        return self._error(b"535 5.7.8 Error: authentication failed") + self._run()

    @property
    def buffered(self) -> int:
        return self.reader.buffered

    def take_rest(self) -> bytes:
        self.closed = True
        return self.reader.take_rest()


# Commands only the proxy may say to the backend: the backend trusts the
# proxy's address with them (Postfix smtpd_authorized_xclient_hosts,
# smtpd_authorized_xforward_hosts), so a client saying them through the
# proxy would become someone else, or forge its address.
PROXY_ONLY = (b"XCLIENT", b"XFORWARD")
_REFUSAL = b"550 5.7.1 Error: %s is not allowed\r\n"


class AfterAuth:
    """The relayed submission session, after AUTH: bytes pass both ways, but
    what only the proxy may say never reaches the backend, nor is it offered.

    It follows the session as SMTP does (RFC 5321, 2920, 3030): command lines,
    the message after a ``354`` answer to DATA up to the lone dot, BDAT
    chunks by their size, and every reply (multi-line ones included) so that
    it knows which command each answers. Bytes after DATA wait until the
    backend has answered it, so a client that pipelines past a refused DATA
    cannot hide commands in what the proxy would take for a message; and a
    refused command is answered in its turn, once what came before it is.
    Extensions in the backend's EHLO answers that clients may not use are
    left out. No I/O: bytes in, :class:`ToBackend` and :class:`ToClient` out.
    """

    def __init__(self, max_line: int = 65536) -> None:
        self.max_line = max_line
        self._client = bytearray()  # client bytes not yet passed on
        self._mode = "command"  # or "data" (up to CRLF.CRLF), "bdat" (a chunk), "long" (a line)
        self._chunk_left = 0
        self._data_tail = b"\r\n"  # the message's last bytes passed on
        self._awaiting: list[bytes] = []  # verbs passed on and not yet answered, oldest first
        self._data_pending = False  # DATA passed on, its answer not yet here
        self._replies = bytearray()  # backend bytes of an EHLO answer not yet complete
        self._ehlo_lines: list[bytes] = []

    @property
    def waiting(self) -> int:
        """Client bytes held back until the backend answers (for flow control)."""
        return len(self._client)

    # -- client → backend ----------------------------------------------------------------

    def feed_client(self, data: bytes) -> list[ToBackend | ToClient]:
        self._client += data
        return self._pump()

    def _pump(self) -> list[ToBackend | ToClient]:
        out: list[ToBackend | ToClient] = []
        passed = bytearray()
        while self._client and not self._data_pending:
            if self._mode == "data":
                passed += self._take_message()
            elif self._mode == "bdat":
                take = min(self._chunk_left, len(self._client))
                passed += self._client[:take]
                del self._client[:take]
                self._chunk_left -= take
                if not self._chunk_left:
                    self._mode = "command"
            else:
                end = self._client.find(b"\n")
                if self._mode == "long" or (end < 0 and len(self._client) > self.max_line):
                    # Longer than any command: passed on for the backend to
                    # refuse as one unknown command, read to its end unparsed.
                    upto = end + 1 if end >= 0 else len(self._client)
                    if self._mode != "long":
                        self._awaiting.append(b"")
                    passed += self._client[:upto]
                    del self._client[:upto]
                    self._mode = "long" if end < 0 else "command"
                    continue
                if end < 0:
                    break
                line = bytes(self._client[: end + 1])
                words = line.split()
                verb = words[0].upper() if words else b""
                if verb in PROXY_ONLY:
                    if passed or self._awaiting:
                        break  # answered in its turn, after what came before
                    del self._client[: end + 1]
                    out.append(ToClient(_REFUSAL % verb))
                    continue
                del self._client[: end + 1]
                passed += line
                self._awaiting.append(verb)
                if verb == b"DATA":
                    self._data_pending = True
                elif verb == b"BDAT" and len(words) > 1 and words[1].isdigit() \
                        and len(words[1]) <= 18:
                    # The chunk follows at once, whatever the answer will be.
                    self._chunk_left = int(words[1])
                    if self._chunk_left:
                        self._mode = "bdat"
        if passed:
            out.insert(0, ToBackend(bytes(passed)))
        return out

    def _take_message(self) -> bytes:
        """Message bytes, up to and including the lone dot if it is here."""
        boundary = (self._data_tail + bytes(self._client[:4])).find(b"\r\n.\r\n")
        if boundary >= 0:
            upto = boundary + 5 - len(self._data_tail)
        else:
            found = self._client.find(b"\r\n.\r\n")
            upto = found + 5 if found >= 0 else -1
        if upto >= 0:
            taken = bytes(self._client[:upto])
            del self._client[:upto]
            self._mode = "command"
            self._awaiting.append(b".")  # the message gets a reply of its own
            return taken
        taken = bytes(self._client)
        self._client.clear()
        self._data_tail = (self._data_tail + taken[-4:])[-4:]
        return taken

    # -- backend → client ----------------------------------------------------------------

    def feed_backend(self, data: bytes) -> list[ToBackend | ToClient]:
        if not self._replies and not self._awaiting:
            # Nothing asked: whatever the backend says (a 421 on its way
            # out) goes on unparsed.
            return [ToClient(data)]
        self._replies += data
        passed = bytearray()
        while self._awaiting:
            end = self._replies.find(b"\n")
            if end < 0:
                break
            line = bytes(self._replies[: end + 1])
            del self._replies[: end + 1]
            final = line[3:4] != b"-"
            verb = self._awaiting[0]
            if verb in (b"EHLO", b"LHLO"):
                self._ehlo_lines.append(line)
                if final:
                    passed += self._filtered_ehlo()
            else:
                passed += line
            if final:
                self._awaiting.pop(0)
                if verb == b"DATA":
                    self._data_pending = False
                    if line[:3] == b"354":
                        self._mode = "data"
                        self._data_tail = b"\r\n"
        if self._replies and not (self._awaiting and self._awaiting[0] in (b"EHLO", b"LHLO")):
            # Part of a line that is not an EHLO answer: no need to wait for its end.
            passed += self._replies
            self._replies.clear()
        out: list[ToBackend | ToClient] = [ToClient(bytes(passed))] if passed else []
        if self._client:
            out += self._pump()
        return out

    def _filtered_ehlo(self) -> bytes:
        lines, self._ehlo_lines = self._ehlo_lines, []
        if not lines[0].startswith(b"250"):
            return b"".join(lines)
        kept = lines[:1] + [
            line for line in lines[1:]
            if (line[4:].split(None, 1) or [b""])[0].upper() not in PROXY_ONLY
        ]
        # Every line but the last says "250-"; the last "250 ".
        return b"".join(
            line[:3] + (b" " if i == len(kept) - 1 else b"-") + line[4:]
            for i, line in enumerate(kept)
        )


class SMTPListener(Listener):
    def buildProtocol(self, addr: Any) -> SMTPServer:
        protocol = SMTPServer(self)
        protocol.factory = self
        return protocol


class SMTPServer(RelayingServer):
    protocol_name = "smtp"

    def make_machine(self) -> PreAuth:
        return PreAuth(
            hostname=self.listener.backend.hostname,
            tls=self.config.tls == "implicit",
            starttls=self.config.tls == "starttls" and self.listener.tls is not None,
            allow_plaintext=self.config.allow_plaintext_auth,
            extensions=self.listener.backend.extensions,
            max_line=self.config.max_line_length,
            max_errors=self.config.max_bad_commands or 20,
        )

    def bye(self, text: str) -> bytes:
        return b"421 4.7.0 " + text.encode() + b"\r\n"

    def make_guard(self) -> AfterAuth:
        return AfterAuth()

    def logged_in(self, event: Login, backend: Any) -> bytes:
        return b"235 2.7.0 Authentication successful\r\n"
