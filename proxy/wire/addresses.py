"""Client addresses as the proxy compares them: with any IPv6 scope dropped
and IPv4-mapped IPv6 addresses (``::ffff:192.0.2.7``, what a dual-stack
socket reports) taken as the IPv4 address they carry."""

from __future__ import annotations

import ipaddress

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip(text: str) -> IP | None:
    """The address ``text`` names, or None if it names none."""
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address
