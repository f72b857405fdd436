"""Connections: how the proxy opens them to servers (:func:`tcp_endpoint`)
and how every part of it ends them (:func:`hang_up`).

``transport.loseConnection()`` alone is not enough on TLS:

- Twisted's TLS layer (``TLSMemoryBIOProtocol``) starts its shutdown only
  once no producer is registered on it, and relayed connections always have
  one (the other side's transport, or a :class:`ReadControl`). A goodbye
  followed by ``loseConnection()`` then left the socket open for as long as
  the client cared to wait: forever, for clients that wait for the server to
  close (mbsync, imtest, openssl s_client).
- After its close alert, the TLS layer waits for the peer's; a peer that
  never sends one (or never finishes its handshake, or never reads) holds
  the socket open.

So :func:`hang_up` unregisters the producer first, then asks for an orderly
close (what was written is still sent, then TLS's close alert, then FIN),
and gives that a deadline: while bytes are still leaving, the deadline moves
on; once nothing moves, the connection is aborted.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import endpoints

# How long an orderly close may stand still (no byte leaving) before the
# connection is aborted. A client that answers TLS's close alert does so
# within a round trip; one that does not gets this long.
CLOSE_GRACE = 2.0


def pending_output(transport: Any) -> int:
    """Bytes written to ``transport`` (TLS, then TCP below it) not yet taken
    by the kernel. Reads Twisted's private buffers; a transport without them
    counts as empty, which only makes the deadline stricter."""
    pending = 0
    while transport is not None:
        pending += sum(len(b) for b in getattr(transport, "_appSendBuffer", ()))
        buffer = getattr(transport, "dataBuffer", b"")
        pending += len(buffer) - getattr(transport, "offset", 0)
        pending += getattr(transport, "_tempDataLen", 0)
        transport = getattr(transport, "transport", None)
    return pending


class _Deadline:
    def __init__(self, transport: Any, clock: Any, grace: float) -> None:
        self.transport = transport
        self.clock = clock
        self.grace = grace
        self.left = pending_output(transport)
        self.call = clock.callLater(grace, self.check)

    def check(self) -> None:
        transport = self.transport
        if not getattr(transport, "connected", False):
            return
        left = pending_output(transport)
        if 0 < left < self.left:
            # A slow reader still taking the last answer: let it.
            self.left = left
            self.call = self.clock.callLater(self.grace, self.check)
            return
        transport.abortConnection()

    def cancel(self) -> None:
        if self.call.active():
            self.call.cancel()


def hang_up(transport: Any, clock: Any, grace: float = CLOSE_GRACE) -> _Deadline | None:
    """End the connection on ``transport``: what was written is still sent,
    then TLS's close alert, then the socket closes. Returns the deadline,
    which the caller cancels when the connection is lost (or None if the
    connection is already gone)."""
    if transport is None or not getattr(transport, "connected", True):
        return None
    try:
        transport.unregisterProducer()
    except RuntimeError:
        pass  # none registered (in-memory test transports say so loudly)
    # Reading may have been paused; TLS must read the peer's close alert.
    transport.resumeProducing()
    transport.loseConnection()
    if not getattr(transport, "connected", True):
        return None
    return _Deadline(transport, clock, grace)


def tcp_endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """A TCP client endpoint; an address is used as it is, without a trip
    through the resolver's thread pool on every connection."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 6:
        return endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
