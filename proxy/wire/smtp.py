"""SMTP words both sides of the proxy use: which of the backend's extensions
mean the same through the proxy, and RFC 3461's xtext. No I/O."""

from __future__ import annotations

from collections.abc import Sequence

# Extensions of the backend that mean the same through the proxy; the rest
# (AUTH, STARTTLS, XCLIENT, ...) are the proxy's business or not offered.
PASSED_EXTENSIONS = (
    b"SIZE", b"PIPELINING", b"8BITMIME", b"CHUNKING", b"BINARYMIME", b"SMTPUTF8", b"DSN",
    b"DELIVERBY", b"MT-PRIORITY", b"FUTURERELEASE",
)
DEFAULT_EXTENSIONS = (b"PIPELINING", b"8BITMIME")


def passed_extensions(ehlo_lines: Sequence[bytes]) -> list[bytes]:
    """The backend's EHLO keywords (first line, the greeting, left out) that
    clients may use through the proxy."""
    kept = []
    for line in ehlo_lines[1:]:
        keyword = line.split(b" ", 1)[0].upper()
        if keyword in PASSED_EXTENSIONS:
            kept.append(line)
    return kept


def xtext(value: str) -> bytes:
    """RFC 3461 xtext: ``+`` and ``=`` and anything outside ``!`` to ``~`` as ``+XX``."""
    out = bytearray()
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (ord("+"), ord("=")):
            out.append(byte)
        else:
            out += b"+%02X" % byte
    return bytes(out)
