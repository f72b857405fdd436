"""IMAP's wire format before login: command lines with literals, and the
few argument forms pre-login commands use. No I/O.

Written by hand because the stock ``twisted.mail.imap4.IMAP4Server`` is a
whole mail server whose pre-login dialogue executes commands pipelined
after STARTTLS, and it has no limits on literal sizes before login. Here the
reader hands out one whole command at a time, and the protocol decides what
happens to the bytes after it.
"""

from __future__ import annotations

import re

import attrs

# RFC 3501 ATOM-CHAR: any CHAR except atom-specials; ASTRING-CHAR adds "]".
_ATOM = re.compile(rb'[^\x00-\x20\x7f(){%*"\\\]]+')
_ASTRING = re.compile(rb'[^\x00-\x20\x7f(){%*"\\]+')
_LITERAL = re.compile(rb"~?\{(\d{1,10})([+-]?)\}$")
_TAG = re.compile(rb"[^\x00-\x20\x7f(){%*\"\\+]+")


class CommandError(Exception):
    """A command that cannot be parsed: answered BAD, counted as a bad command."""

    def __init__(self, text: str, tag: bytes = b"*") -> None:
        super().__init__(text)
        self.tag = tag


class TooLong(Exception):
    """A line or literal over the limit: the connection cannot be resynchronised."""


@attrs.frozen
class Literal:
    """A literal's announcement: the reader waits for its bytes."""

    size: int
    synchronizing: bool


@attrs.frozen
class Command:
    tag: bytes
    name: bytes  # upper-case
    args: tuple[object, ...]  # bytes (atom, string, literal), None (NIL), tuple (list)


class Reader:
    """Cuts the client's bytes into whole commands (literals included).

    ``feed`` returns what it found in order: :class:`Literal` when a
    synchronizing literal needs a continuation request, and the raw pieces of
    each whole command as a list (text, literal bytes, text, ...).
    """

    def __init__(self, max_line: int, max_literal: int) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self.buffer = bytearray()
        self._pieces: list[bytes] = []
        self._literal: int | None = None
        self._size = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished command."""
        return len(self.buffer) + sum(len(p) for p in self._pieces)

    def take_rest(self) -> bytes:
        """What is buffered beyond the last whole command; the reader is emptied."""
        rest = bytes(self.buffer)
        self.buffer.clear()
        self._pieces = []
        self._literal = None
        self._size = 0
        return rest

    def line(self) -> bytes | None:
        """One raw line (for SASL continuations), or None if none is complete."""
        end = self.buffer.find(b"\r\n")
        if end < 0:
            if len(self.buffer) > self.max_line:
                raise TooLong("line too long")
            return None
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    def next(self) -> Literal | list[bytes] | None:
        """The next whole command or literal announcement; None if more bytes are needed."""
        while True:
            if self._literal is not None:
                if len(self.buffer) < self._literal:
                    return None
                self._pieces.append(bytes(self.buffer[: self._literal]))
                del self.buffer[: self._literal]
                self._literal = None
            end = self.buffer.find(b"\r\n")
            if end < 0:
                if len(self.buffer) > self.max_line:
                    raise TooLong("line too long")
                return None
            if end > self.max_line:
                raise TooLong("line too long")
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            self._size += len(line)
            if self._size > self.max_line + 4 * self.max_literal:
                raise TooLong("command too long")
            match = _LITERAL.search(line)
            if match is None:
                pieces, self._pieces, self._size = self._pieces + [line], [], 0
                return pieces
            size, kind = int(match[1]), match[2]
            self._pieces.append(line[: match.start()])
            if size > self.max_literal:
                if kind == b"":
                    # Synchronizing: the client waits for "+", so the command
                    # can be refused without reading the literal.
                    tag = tag_of(self._pieces[0])
                    self._pieces, self._size = [], 0
                    raise CommandError(f"literal of {size} octets is too large", tag)
                raise TooLong("non-synchronizing literal too large")
            self._literal = size
            self._size += size
            if kind == b"":
                return Literal(size, True)


def _parse_string(text: bytes, i: int) -> tuple[bytes, int]:
    """A quoted string starting at text[i] == '"'."""
    out = bytearray()
    i += 1
    while i < len(text):
        c = text[i]
        if c == 0x5C:  # backslash
            if i + 1 >= len(text) or text[i + 1] not in b'"\\':
                raise CommandError("bad escape in a quoted string")
            out.append(text[i + 1])
            i += 2
        elif c == 0x22:
            return bytes(out), i + 1
        elif c in (0x0D, 0x0A):
            raise CommandError("line break in a quoted string")
        else:
            out.append(c)
            i += 1
    raise CommandError("unterminated quoted string")


def parse(pieces: list[bytes]) -> Command:
    """Tokenise a whole command: text pieces with literals between them."""
    tokens: list[object] = []
    stack: list[list[object]] = [tokens]
    for index, piece in enumerate(pieces):
        if index % 2 == 1:  # a literal's bytes
            stack[-1].append(piece)
            continue
        i = 0
        while i < len(piece):
            c = piece[i]
            if c == 0x20:
                i += 1
            elif c == 0x22:
                value, i = _parse_string(piece, i)
                stack[-1].append(value)
            elif c == 0x28:  # (
                inner: list[object] = []
                stack[-1].append(inner)
                stack.append(inner)
                if len(stack) > 8:
                    raise CommandError("lists nested too deep")
                i += 1
            elif c == 0x29:  # )
                if len(stack) == 1:
                    raise CommandError("unbalanced parenthesis")
                stack.pop()
                i += 1
            else:
                match = _ASTRING.match(piece, i)
                if match is None:
                    raise CommandError("unexpected character")
                atom = match.group()
                stack[-1].append(None if atom.upper() == b"NIL" else atom)
                i = match.end()
    if len(stack) != 1:
        raise CommandError("unbalanced parenthesis")
    if len(tokens) < 2 or not isinstance(tokens[0], bytes) or not isinstance(tokens[1], bytes):
        raise CommandError("a command needs a tag and a name")
    tag, name = tokens[0], tokens[1]
    if not _TAG.fullmatch(tag):
        raise CommandError("bad tag")
    return Command(tag, name.upper(), tuple(_freeze(t) for t in tokens[2:]))


def _freeze(token: object) -> object:
    return tuple(_freeze(t) for t in token) if isinstance(token, list) else token


def tag_of(line: bytes) -> bytes:
    """The tag of a line that could not be parsed, for the BAD answer; ``*`` if none."""
    match = _TAG.match(line)
    return match.group() if match else b"*"


def quote(value: str | bytes) -> bytes:
    """An IMAP quoted string (for values the proxy sends: no CR, LF or NUL)."""
    raw = value.encode() if isinstance(value, str) else value
    if b"\r" in raw or b"\n" in raw or b"\x00" in raw:
        raise ValueError("cannot quote CR, LF or NUL")
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
