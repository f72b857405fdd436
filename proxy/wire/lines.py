"""Command lines, as SMTP and POP3 send them before login: CRLF-ended, of
bounded length. No I/O."""

from __future__ import annotations


class TooLong(Exception):
    """A line longer than the limit, ended or not."""


class LineReader:
    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def line(self) -> bytes | None:
        """The next whole line without its CRLF, or None until one is here."""
        end = self.buffer.find(b"\r\n")
        if end < 0:
            if len(self.buffer) > self.max_line:
                raise TooLong()
            return None
        if end > self.max_line:
            raise TooLong()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    def take_rest(self) -> bytes:
        """What is buffered beyond the last whole line; the reader is emptied."""
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest
