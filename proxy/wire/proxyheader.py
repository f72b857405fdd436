"""The PROXY protocol header (HAProxy's, versions 1 and 2) that a load
balancer sends before a client's first byte, naming the client's address.

Written here rather than taken from ``twisted.protocols.haproxy``: that
module's parsers are private, and its wrapper hands the connection to the
protocol before the header has arrived, so a front end would see the
balancer's address at connect time.

:func:`parse` reads a buffer: ``(None, 0)`` while the header is incomplete,
``(Header, length)`` once it is whole, :class:`BadHeader` for anything else.
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest version 1 line, CRLF included
V2_MAX = 16 + 2048  # TLVs beyond the addresses are skipped; no balancer sends more
MAX = V2_MAX
# What a version 1 address is written with. ``ipaddress`` also takes an IPv6
# zone (``fe80::1%eth0``) of any characters but ``%``, escape sequences and
# line breaks included: the protocol carries plain addresses only, and the
# address goes on to log lines and the operator's terminal.
_ADDRESS_BYTES = frozenset(b"0123456789abcdefABCDEF.:")


class BadHeader(ValueError):
    """Not a PROXY header, or a malformed one."""


@attrs.frozen
class Header:
    # The client's address and port; None for a balancer's own connection
    # (version 2 LOCAL, version 1 UNKNOWN): health checks.
    source: tuple[str, int] | None
    destination: tuple[str, int] | None = None


def parse(buffer: bytes) -> tuple[Header | None, int]:
    if buffer[:1] == b"P":
        return _v1(buffer)
    if buffer[:1] == b"\r":
        return _v2(buffer)
    if buffer:
        raise BadHeader("not a PROXY header")
    return None, 0


def _v1(buffer: bytes) -> tuple[Header | None, int]:
    n = min(len(buffer), 6)
    if buffer[:n] != b"PROXY "[:n]:
        raise BadHeader("not a PROXY header")
    end = buffer.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buffer) >= V1_MAX:
            raise BadHeader("a version 1 header longer than 107 bytes")
        return None, 0
    words = buffer[:end].split(b" ")
    if len(words) >= 2 and words[1] == b"UNKNOWN":
        return Header(None), end + 2
    if len(words) != 6 or words[1] not in (b"TCP4", b"TCP6"):
        raise BadHeader("a malformed version 1 header")
    if not _ADDRESS_BYTES.issuperset(words[2] + words[3]):
        raise BadHeader("a version 1 header with an address zone or other characters no address has")
    try:
        version = 4 if words[1] == b"TCP4" else 6
        source = ipaddress.ip_address(words[2].decode("ascii"))
        destination = ipaddress.ip_address(words[3].decode("ascii"))
        ports = [int(w) for w in words[4:6]]
    except (ValueError, UnicodeDecodeError):
        raise BadHeader("a malformed version 1 header") from None
    if source.version != version or destination.version != version or \
            not all(0 <= p <= 65535 and str(p).encode() == w for p, w in zip(ports, words[4:6])):
        raise BadHeader("a malformed version 1 header")
    return Header((str(source), ports[0]), (str(destination), ports[1])), end + 2


def _v2(buffer: bytes) -> tuple[Header | None, int]:
    n = min(len(buffer), len(V2_SIGNATURE))
    if buffer[:n] != V2_SIGNATURE[:n]:
        raise BadHeader("not a PROXY header")
    if len(buffer) < 16:
        return None, 0
    version_command, family, length = struct.unpack("!BBH", buffer[12:16])
    if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
        raise BadHeader("an unknown PROXY version or command")
    if 16 + length > V2_MAX:
        raise BadHeader("a version 2 header longer than this proxy takes")
    if len(buffer) < 16 + length:
        return None, 0
    body = buffer[16 : 16 + length]
    if version_command & 0x0F == 0:  # LOCAL: the balancer's own connection
        return Header(None), 16 + length
    if family == 0x11 and length >= 12:  # TCP over IPv4
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
    elif family == 0x21 and length >= 36:  # TCP over IPv6
        src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
    elif family in (0x00, 0x31, 0x32, 0x12, 0x22):  # unspecified, unix, UDP: no client address
        return Header(None), 16 + length
    else:
        raise BadHeader("a malformed version 2 header")
    # Addresses from 4 or 16 bytes: never a zone, always printable.
    source = str(ipaddress.ip_address(src))
    destination = str(ipaddress.ip_address(dst))
    return Header((source, sport), (destination, dport)), 16 + length
