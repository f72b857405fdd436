"""Ports for the servers the tests start: the one free-port helper.

A server that can listen on port 0 and report its port (the SMTP sink in
tests/dovecot.py) does so and needs none of this. The rest (slapd, Dovecot,
PostgreSQL, the daemon) take their ports from a config written before they
start, so a number must be chosen first, and between choosing it and the
server's bind another process may take it. Binding port 0 and closing, as
the tests did, makes that race likely: the kernel hands out the same
ephemeral range to every outgoing connection, and the tests open thousands
of them (a port it just gave a test is soon given to a client socket).
So `free_port` hands out ports from outside the kernel's ephemeral range
(/proc/sys/net/ipv4/ip_local_port_range), where no outgoing connection
lands; checks each is free by binding it on every address; starts at an
offset from the process id, so that two test sessions on one machine do not
walk the same sequence; and never hands out a port twice in a session (a
server stopped and restarted keeps its own). Servers that still lose the
race (slapd, Dovecot) retry with new ports.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

# Above the well-known and most registered services' ports.
_LOWEST = 10000
_HIGHEST = 65535


def _outside_ephemeral() -> range:
    """The longest span of [_LOWEST, _HIGHEST] the kernel does not use for
    outgoing connections."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    spans = [range(_LOWEST, max(_LOWEST, low)), range(min(high + 1, _HIGHEST + 1), _HIGHEST + 1)]
    return max(spans, key=len)


_SPAN = _outside_ephemeral()
_given: set[int] = set()
_lock = threading.Lock()
_next = os.getpid() * 7919 % len(_SPAN)


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))  # every address: taken on any one of them is taken
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port no one listens on now, outside the kernel's ephemeral range,
    not handed out before in this session (see the module's docstring)."""
    global _next
    with _lock:
        for _ in range(len(_SPAN)):
            port = _SPAN[_next]
            _next = (_next + 1) % len(_SPAN)
            if port not in _given and _is_free(port):
                _given.add(port)
                return port
    raise RuntimeError(f"no free port in {_SPAN.start}-{_SPAN.stop - 1}")
