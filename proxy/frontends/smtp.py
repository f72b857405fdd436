"""The SMTP submission front end: legacy clients authenticate, the core
decides, and the session is relayed to the real submission server.

:class:`PreAuth` is the dialogue up to a successful AUTH as a state machine
that does no I/O. Written by hand because the stock
``twisted.mail.smtp.ESMTP`` is a LineOnlyReceiver that executes commands
pipelined after STARTTLS. Every reply carries an RFC 3463 enhanced status
code (RFC 4954 section 6).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs

from proxy.frontends.base import (
    Event,
    LineDialogue,
    Listener,
    Login,
    Moves,
    Phases,
    RelayingServer,
    Send,
    StartTLS,
    ToBackend,
    ToClient,
    login_event,
)
from proxy.wire import sasl
from proxy.wire.lines import LineReader
from proxy.wire.smtp import DEFAULT_EXTENSIONS, PASSED_EXTENSIONS

_SASL_FAILURES = {
    "cancelled": b"501 5.0.0 Authentication cancelled",
    "base64": b"501 5.5.2 Cannot decode response",
    "malformed": b"501 5.5.2 Invalid PLAIN message",
}


class PreAuth(LineDialogue):
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
        max_bad: int = 20,
        bearer: bool = False,
    ) -> None:
        super().__init__(tls=tls, starttls=starttls, allow_plaintext=allow_plaintext,
                         max_bad=max_bad, reader=LineReader(max_line), bearer=bearer)
        self.hostname = hostname.encode()
        self.extensions = list(extensions)
        self.helo = False
        self._sasl: sasl.Exchange | None = None

    def greeting(self) -> bytes:
        return b"220 " + self.hostname + b" ESMTP ready\r\n"

    # -- replies --------------------------------------------------------------------

    def _reply(self, text: bytes) -> Send:
        return Send(text + b"\r\n")

    def _error(self, text: bytes) -> list[Event]:
        events: list[Event] = [self._reply(text)]
        if self._one_more_bad():
            events += self._close(b"421 4.7.0 Error: too many errors")
        return events

    def _ehlo(self) -> list[Event]:
        lines = [self.hostname] + list(self.extensions) + [b"ENHANCEDSTATUSCODES"]
        if self.starttls and not self.tls:
            lines.append(b"STARTTLS")
        if self.can_login:
            lines.append(b"AUTH " + " ".join(self.mechanisms).encode())
        body = b"".join(b"250-" + line + b"\r\n" for line in lines[:-1])
        return [Send(body + b"250 " + lines[-1] + b"\r\n")]

    # -- input ------------------------------------------------------------------------

    def _bad_characters(self) -> list[Event]:
        return self._error(b"500 5.5.2 Error: bad characters in command")

    def _too_long(self) -> list[Event]:
        return self._close(b"500 5.5.0 Error: line too long")

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
        if mechanism not in self.mechanisms:
            return self._error(b"504 5.5.4 Unrecognized authentication type")
        self._sasl = sasl.Exchange(mechanism)
        return self._sasl_step(self._sasl.start(parts[1] if len(parts) == 2 else None))

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

# What a client may say to the backend after AUTH; the proxy answers the
# rest itself. Above all the commands the backend trusts from the proxy's
# address (XCLIENT, XFORWARD: Postfix's smtpd_authorized_xclient_hosts), and
# STARTTLS, which would give the client a TLS session with the backend that
# the proxy can no longer read.
AFTER_AUTH = frozenset({b"MAIL", b"RCPT", b"DATA", b"BDAT", b"RSET", b"NOOP", b"QUIT", b"HELP",
                        b"VRFY", b"EHLO", b"HELO"})
_ANSWERS = {
    b"XCLIENT": b"550 5.7.1 Error: XCLIENT is not allowed\r\n",
    b"XFORWARD": b"550 5.7.1 Error: XFORWARD is not allowed\r\n",
    b"AUTH": b"503 5.5.1 Error: already authenticated\r\n",
    b"STARTTLS": b"503 5.5.1 Error: STARTTLS is not available after AUTH\r\n",
}
_NOT_AVAILABLE = b"502 5.5.1 Error: command not available\r\n"
_BAD_CHARACTERS = b"500 5.5.2 Error: bad characters in command\r\n"
_TOO_LONG = b"500 5.5.2 Error: line too long\r\n"
_BDAT_SYNTAX = b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"
_BDAT_SEQUENCE = b"503 5.5.1 Error: need MAIL and RCPT before BDAT\r\n"
_BDAT_UNAVAILABLE = b"502 5.5.1 Error: BDAT not available\r\n"
_BDAT = re.compile(rb"BDAT ([0-9]{1,18})( LAST)?", re.IGNORECASE)
_EHLO_KEPT = frozenset(PASSED_EXTENSIONS) | {b"ENHANCEDSTATUSCODES"}


class Reading(Phases):
    """What the client's next bytes are, after AUTH (:data:`READING` says
    how it changes)."""

    COMMAND = "command"  # command lines
    MESSAGE = "message"  # a message, after the backend's 354 to DATA
    CHUNK = "chunk"  # a BDAT chunk, passed on
    SKIP_CHUNK = "skip chunk"  # a refused BDAT's chunk, dropped
    SKIP_LINE = "skip line"  # the rest of a line too long, dropped


READING: Moves[Reading] = Moves("SMTP after AUTH", {
    Reading.COMMAND: {"too_long": Reading.SKIP_LINE, "go_ahead": Reading.MESSAGE,
                      "chunk": Reading.CHUNK, "skip_chunk": Reading.SKIP_CHUNK},
    Reading.SKIP_LINE: {"line_end": Reading.COMMAND},
    Reading.MESSAGE: {"message_end": Reading.COMMAND},
    Reading.CHUNK: {"chunk_end": Reading.COMMAND},
    Reading.SKIP_CHUNK: {"chunk_end": Reading.COMMAND},
})


@attrs.frozen
class _Own:
    """A reply the proxy gives in its turn, after the backend's to what came before."""

    data: bytes


class AfterAuth:
    """The relayed submission session, after AUTH: bytes pass both ways, but
    only what a client may say reaches the backend.

    It follows the session as SMTP does (RFC 5321, 2920, 3030), so that it
    knows what every byte is: command lines (ended by CRLF, or a bare LF,
    passed on as CRLF), the message after a ``354`` answer to DATA (bare LFs
    made CRLF, as Postfix's smtpd_forbid_bare_newline=normalize does, so
    that no backend can see a message end where the proxy did not), BDAT
    chunks, and every reply, multi-line ones included, so that it knows
    which command each answers. Commands other than :data:`AFTER_AUTH` are
    answered by the proxy, in their turn. Bytes after DATA wait for the
    backend's answer to it, and a BDAT for the answers before it: its chunk
    is passed on only where the backend offers CHUNKING and a MAIL and a
    RCPT were accepted, for otherwise a backend may read the chunk as
    commands. The backend's EHLO answers offer only what clients may use.
    No I/O: bytes in, :class:`ToBackend` and :class:`ToClient` out. What
    the client's bytes are is one :class:`Reading`, moved only as
    :data:`READING` allows.
    """

    def __init__(self, chunking: bool = False, max_line: int = 4096) -> None:
        self.chunking = chunking
        self.max_line = max_line
        self._client = bytearray()  # client bytes not yet passed on
        self.reading = Reading.COMMAND
        self._left = 0  # bytes of a chunk still to come
        self._tail = b"\r\n"  # the message's last bytes passed on, normalised
        self._queue: deque[bytes | _Own] = deque()  # commands passed on, awaiting replies
        self._hold: bytes | None = None  # b"DATA", or the BDAT line, waiting for replies
        self._mail = self._rcpt = False  # the transaction so far, by the backend's replies
        self._replies = bytearray()  # backend bytes of a line not yet complete
        self._ehlo_lines: list[bytes] = []

    @property
    def waiting(self) -> int:
        """Client bytes held back until the backend answers (for flow control)."""
        return len(self._client)

    def _move(self, event: str) -> None:
        self.reading = READING.after(self.reading, event)

    # -- client → backend ----------------------------------------------------------------

    def feed_client(self, data: bytes) -> list[ToBackend | ToClient]:
        self._client += data
        return self._pump()

    def _pump(self) -> list[ToBackend | ToClient]:
        out: list[ToBackend | ToClient] = []
        passed = bytearray()

        def own(reply: bytes) -> None:
            # In its turn: now if nothing passed on awaits an answer.
            if passed or self._queue:
                self._queue.append(_Own(reply))
            else:
                out.append(ToClient(reply))

        while self._client:
            if self._hold is not None:
                if self._hold == b"DATA" or self._queue or passed:
                    break
                self._start_chunk(self._hold, passed, own)
                continue
            if self.reading is Reading.MESSAGE:
                passed += self._take_message()
            elif self.reading in (Reading.CHUNK, Reading.SKIP_CHUNK):
                take = min(self._left, len(self._client))
                if self.reading is Reading.CHUNK:
                    passed += self._client[:take]
                del self._client[:take]
                self._left -= take
                if not self._left:
                    self._move("chunk_end")
            else:
                end = self._client.find(b"\n")
                if self.reading is Reading.SKIP_LINE or (end < 0 and len(self._client) > self.max_line):
                    del self._client[: end + 1 if end >= 0 else len(self._client)]
                    if self.reading is Reading.COMMAND:
                        own(_TOO_LONG)
                        self._move("too_long")
                    if end >= 0:
                        self._move("line_end")
                    continue
                if end < 0:
                    break
                line = bytes(self._client[:end]).removesuffix(b"\r")
                del self._client[: end + 1]
                self._command(line, passed, own)
        if passed:
            out.insert(0, ToBackend(bytes(passed)))
        return out

    def _command(self, line: bytes, passed: bytearray, own: Any) -> None:
        if b"\r" in line or b"\x00" in line:
            own(_BAD_CHARACTERS)
            return
        words = line.split(b" ")
        verb = words[0].upper()
        if verb not in AFTER_AUTH:
            own(_ANSWERS.get(verb, _NOT_AVAILABLE))
            return
        if verb == b"BDAT":
            if not _BDAT.fullmatch(line[:4].upper() + line[4:]):
                own(_BDAT_SYNTAX)
                return
            self._hold = line  # its chunk waits for the answers before it
            return
        passed += line + b"\r\n"
        self._queue.append(verb)
        if verb == b"DATA":
            self._hold = b"DATA"

    def _start_chunk(self, line: bytes, passed: bytearray, own: Any) -> None:
        """A BDAT whose turn has come: everything before it is answered."""
        self._hold = None
        found = _BDAT.fullmatch(line[:4].upper() + line[4:])
        assert found is not None
        self._left = int(found.group(1))
        last = found.group(2) is not None
        if not self.chunking or not (self._mail and self._rcpt):
            own(_BDAT_UNAVAILABLE if not self.chunking else _BDAT_SEQUENCE)
            if self._left:
                self._move("skip_chunk")
            return
        passed += line + b"\r\n"
        self._queue.append(b"BDAT LAST" if last else b"BDAT")
        if self._left:
            self._move("chunk")

    def _take_message(self) -> bytes:
        """Message bytes, bare LFs made CRLF, up to and including the lone
        dot if it is here."""
        chunk = bytes(self._client)
        self._client.clear()
        if self._tail.endswith(b"\r") and chunk.startswith(b"\n"):
            # A CRLF split across two reads: its LF is not bare.
            normal = b"\n" + chunk[1:].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        else:
            normal = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        joined = self._tail + normal
        end = joined.find(b"\r\n.\r\n")
        if end < 0:
            self._tail = joined[-4:]
            return normal
        upto = end + 5 - len(self._tail)
        # What followed the dot is commands: back to be read as such.
        rest = normal[upto:]
        self._client[:0] = rest
        self._move("message_end")
        self._tail = b"\r\n"
        self._queue.append(b".")  # the message gets a reply of its own
        return normal[:upto]

    # -- backend → client ----------------------------------------------------------------

    def feed_backend(self, data: bytes) -> list[ToBackend | ToClient]:
        if not self._replies and not self._queue and data.endswith(b"\n"):
            # Nothing asked: whatever the backend says (a 421 on its way
            # out) goes on as it is.
            return [ToClient(data)]
        self._replies += data
        passed = bytearray()
        while True:
            end = self._replies.find(b"\n")
            if end < 0:
                break
            line = bytes(self._replies[: end + 1])
            del self._replies[: end + 1]
            head = self._queue[0] if self._queue else None
            final = line[3:4] != b"-"
            if head in (b"EHLO", b"HELO"):
                self._ehlo_lines.append(line)
                if final:
                    passed += self._filtered_ehlo()
            else:
                passed += line
            if final and isinstance(head, bytes):
                self._queue.popleft()
                self._answered(head, line[:3])
            while self._queue and isinstance(self._queue[0], _Own):
                passed += self._queue.popleft().data
        out: list[ToBackend | ToClient] = [ToClient(bytes(passed))] if passed else []
        if self._client:
            out += self._pump()
        return out

    def _answered(self, verb: bytes, code: bytes) -> None:
        ok = code[:1] == b"2"
        if verb == b"DATA":
            self._hold = None
            if code == b"354":
                self._move("go_ahead")
                self._tail = b"\r\n"
            else:
                self._mail = self._rcpt = False
        elif verb == b"MAIL":
            self._mail, self._rcpt = ok, False
        elif verb == b"RCPT":
            self._rcpt = self._rcpt or ok
        elif verb in (b".", b"RSET", b"EHLO", b"HELO", b"BDAT LAST") or (verb == b"BDAT" and not ok):
            self._mail = self._rcpt = False

    def _filtered_ehlo(self) -> bytes:
        lines, self._ehlo_lines = self._ehlo_lines, []
        if not lines[0].startswith(b"250"):
            return b"".join(lines)
        kept = lines[:1] + [
            line for line in lines[1:]
            if (line[4:].split(None, 1) or [b""])[0].upper() in _EHLO_KEPT
        ]
        # Every line but the last says "250-"; the last "250 ".
        return b"".join(
            line[:3] + (b" " if i == len(kept) - 1 else b"-") + line[4:]
            for i, line in enumerate(kept)
        )


class SMTPServer(RelayingServer):
    protocol_name = "smtp"

    def make_machine(self) -> PreAuth:
        # Postfix's hard error limit: 20.
        return PreAuth(hostname=self.listener.backend.hostname,
                       extensions=self.listener.backend.extensions,
                       **self.machine_settings(bad_commands=20))

    def bye(self, text: str) -> bytes:
        return b"421 4.7.0 " + text.encode() + b"\r\n"

    def backend_said_goodbye(self, last: bytes) -> bool:
        lines = last.rstrip(b"\r\n").split(b"\r\n")
        return lines[-1][:3] in (b"221", b"421")

    def make_guard(self) -> AfterAuth:
        offered = {line.split(b" ", 1)[0].upper() for line in self.listener.backend.extensions}
        return AfterAuth(chunking=b"CHUNKING" in offered)

    def logged_in(self, event: Login, backend: Any) -> bytes:
        return b"235 2.7.0 Authentication successful\r\n"


class SMTPListener(Listener):
    server = SMTPServer
