"""Text from outside (a client's address or user name, a device's name, an
old row of the store) made safe to show: on an operator's terminal, on a
page, in a log line or a line of the audit file.

A character Python does not call printable (``str.isprintable``: controls
such as ESC that start a terminal's escape sequences, the line breaks
``str.splitlines()`` splits on, U+2028 and U+2029 among them, bidirectional
overrides, unassigned code points) is shown as an escape instead: so a
value stays on its line and cannot move the cursor, recolour the screen or
reorder what follows it. Printable text, any script, is left as it is.
"""

from __future__ import annotations


def _escape(c: str) -> str:
    n = ord(c)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def printable(text: str) -> str:
    """``text`` for people: every character that is not printable as a
    Python-style escape (``\\x1b``, ``\\u2028``). A backslash stays as it
    is (``DOMAIN\\sam``), so an escape can be typed as well as made; it
    shows, it does not act."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _json_escape(c: str) -> str:
    n = ord(c)
    if n < 0x10000:
        return f"\\u{n:04x}"
    n -= 0x10000  # a UTF-16 surrogate pair, as JSON spells characters past U+FFFF
    return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"


def json_printable(line: str) -> str:
    """A line of JSON (``json.dumps(..., ensure_ascii=False)``) with every
    character that is not printable written as a JSON escape: it decodes to
    the same value, and no line reader (``str.splitlines()`` splits on
    U+0085, U+2028 and U+2029, which JSON leaves raw) cuts it in two. Such
    characters only occur inside the JSON's strings, where an escape is
    what they mean."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else _json_escape(c) for c in line)
