"""The PROXY header (versions 1 and 2): whole, split at any byte, or wrong."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, strategies as st

from proxy.wire.proxyheader import V2_SIGNATURE, BadHeader, Header, parse


def v2(source: str, sport: int, dest: str, dport: int, tlvs: bytes = b"") -> bytes:
    s, d = ipaddress.ip_address(source), ipaddress.ip_address(dest)
    family = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


CASES = [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 993\r\n", Header(("192.0.2.7", 51000), ("198.51.100.1", 993))),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 993\r\n", Header(("2001:db8::7", 51000), ("2001:db8::1", 993))),
    (b"PROXY UNKNOWN\r\n", Header(None)),
    (v2("192.0.2.7", 51000, "198.51.100.1", 143), Header(("192.0.2.7", 51000), ("198.51.100.1", 143))),
    (v2("2001:db8::7", 1, "2001:db8::1", 2, tlvs=b"\x04\x00\x02ab"), Header(("2001:db8::7", 1), ("2001:db8::1", 2))),
    (V2_SIGNATURE + b"\x20\x00\x00\x00", Header(None)),  # LOCAL: a health check
]


@pytest.mark.parametrize("header, expected", CASES)
def test_a_header_is_read_whole_or_in_pieces(header, expected):
    rest = b"a001 CAPABILITY\r\n"
    assert parse(header + rest) == (expected, len(header))
    for cut in range(len(header)):
        assert parse(header[:cut]) == (None, 0)


@pytest.mark.parametrize("bad", [
    b"GET / HTTP/1.1\r\n", b"PROXY TCP4 192.0.2.7 198.51.100.1 51000\r\n",
    b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n", b"PROXY TCP4 192.0.2.7 198.51.100.1 1 99999\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n", b"PROXY TCP4 " + b"1" * 120,
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,  # version 3
    V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # too short for TCP4
    V2_SIGNATURE + b"\x21\x11\xff\xff",  # longer than taken
    b"\r\n\r\nX",
    # Zone ids: ipaddress takes any characters but % after one.
    b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 2\r\n",
    b"PROXY TCP6 fe80::1%\x1b[31mZONE\nX 2001:db8::1 1 2\r\n",
    b"PROXY TCP6 2001:db8::7 fe80::1%1 1 2\r\n",
])
def test_anything_else_is_refused(bad):
    with pytest.raises(BadHeader):
        parse(bad)


def plain(address: tuple[str, int] | None) -> bool:
    """An address with no zone and nothing a log line or a terminal could
    take for anything but an address."""
    return address is None or (
        "%" not in address[0] and set(address[0]) <= set("0123456789abcdef.:"))


@given(st.binary(max_size=300))
def test_any_bytes_are_a_header_a_wait_or_a_refusal(data):
    try:
        header, used = parse(data)
    except BadHeader:
        return
    assert (header is None and used == 0) or 0 < used <= len(data)
    if header is not None:
        assert plain(header.source) and plain(header.destination)


@given(st.binary(min_size=36, max_size=36), st.sampled_from([0x11, 0x21]))
def test_version_2_addresses_are_always_plain(body, family):
    """Version 2 carries addresses as 4 or 16 bytes: whatever they are, no zone."""
    header = V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
    found, _ = parse(header)
    assert found is not None and plain(found.source) and plain(found.destination)


@given(st.text(alphabet=st.characters(blacklist_characters="% \r\n"), min_size=1, max_size=20))
def test_a_version_1_address_with_a_zone_is_refused(zone):
    with pytest.raises(BadHeader):
        parse(f"PROXY TCP6 fe80::1%{zone} 2001:db8::1 1 2\r\n".encode("utf-8", "surrogatepass"))
