"""Connections: how the proxy opens them to servers (:func:`tcp_endpoint`,
:class:`AddressEndpoint`) and how every part of it ends them (:func:`hang_up`).

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

import errno
import ipaddress
import os
import socket
from typing import Any

from twisted.internet import endpoints, error, posixbase, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy.wire import addresses

# How long an orderly close may stand still (no byte leaving) before the
# connection is aborted. A client that answers TLS's close alert does so
# within a round trip; one that does not gets this long.
CLOSE_GRACE = 2.0
# What is still read from a client after its goodbye (TLS reads on, for the
# client's close alert): enough for that alert behind what was already on
# its way, not the stream a condemned client may keep pouring in until the
# deadline, every byte of it decrypted and dropped. Past this, the one who
# hangs up stops reading; the deadline then ends the connection.
AFTER_GOODBYE = 64 * 1024


def pending_output(transport: Any) -> int:
    """Bytes written to ``transport`` (TLS, then TCP below it) not yet taken
    by the kernel. Reads Twisted's private buffers; a transport without them
    counts as empty, which only makes the deadline stricter. Twisted's own
    transports have every one of them: :mod:`proxy.twistedcheck` refuses to
    start on a Twisted that lacks one, so the defaults serve only stand-ins."""
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
    connection is already gone, or is plain TCP with nothing left to send:
    that closes at the end of the reactor's turn, needing none)."""
    if transport is None or not getattr(transport, "connected", True):
        return None
    try:
        transport.unregisterProducer()
    except RuntimeError:
        pass  # none registered (in-memory test transports say so loudly)
    if _plain_tcp(transport):
        if idle_tcp(transport):
            # Nothing left to send: closed at the end of this reactor turn,
            # not after a trip through epoll for the socket to be writable
            # (and a zero-byte send) only to learn that nothing waits.
            transport.stopReading()
            clock.callLater(0, _close_idle, transport, clock, grace)
            return None
        # (Plain TCP stops reading as it closes: resuming would only
        # register the socket in epoll to take it out again.)
    else:
        # Reading may have been paused; TLS must read the peer's close alert.
        transport.resumeProducing()
    transport.loseConnection()
    if not getattr(transport, "connected", True):
        return None
    return _Deadline(transport, clock, grace)


def _close_idle(transport: Any, clock: Any, grace: float) -> None:
    if not transport.connected:
        return
    if idle_tcp(transport):
        # What Twisted does once the socket is writable and nothing waits:
        # shutdown and close, then the protocol is told.
        transport.connectionLost(Failure(ConnectionDone()))
    else:
        hang_up(transport, clock, grace)  # written to since: the usual way


def _plain_tcp(transport: Any) -> bool:
    return isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False)


def idle_tcp(connection: Any, tls_below: bool = False) -> bool:
    """Whether ``connection`` is an open TCP connection with nothing queued
    in Twisted's write buffer, so that bytes sent on its socket now overtake
    nothing. Without ``tls_below`` (bytes from a TLS layer above it), TLS
    must not have been started on it."""
    return (isinstance(connection, tcp.Connection) and bool(connection.connected)
            and not connection.disconnecting and not connection._aborting
            and not connection.dataBuffer and not connection._tempDataBuffer
            and (tls_below or not getattr(connection, "TLS", False)))


def write_now(transport: Any, data: bytes | list[bytes]) -> None:
    """``transport.write(data)`` (or ``writeSequence``, for a list), except
    that on a TCP connection with nothing queued, what the kernel takes at
    once is sent at once (a list in one ``sendmsg``, without joining it): no
    trip through Twisted's write queue, its re-joining copy and an epoll
    change for every chunk relayed. Only what the kernel did not take is
    queued, and flow control (pausing the other side) works on that as
    before. Anything else (TLS started on the connection, bytes already
    queued, an error) goes the usual way, which also reports the error."""
    parts = data if isinstance(data, list) else [data]
    # Under Twisted's STARTTLS layer (its name checked at start: proxy.twistedcheck).
    raw = getattr(transport, "_connection", transport)
    if idle_tcp(raw, tls_below=raw is not transport):
        try:
            sent = raw.socket.send(parts[0]) if len(parts) == 1 else raw.socket.sendmsg(parts)
        except OSError:
            sent = 0
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts = parts[1:]
        if not parts:
            return
        if sent:
            parts = [parts[0][sent:], *parts[1:]]
    if len(parts) == 1:
        transport.write(parts[0])
    else:
        transport.writeSequence(parts)


def tcp_endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """A TCP client endpoint; an address is used as it is, without a trip
    through the resolver's thread pool on every connection."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if isinstance(reactor, posixbase.PosixReactorBase):  # one that watches real sockets
        return AddressEndpoint(reactor, host, port, timeout)
    if address.version == 6:
        return endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


@implementer(IStreamClientEndpoint)
class AddressEndpoint:
    """Connects to an IP address: ``TCP4ClientEndpoint`` and
    ``TCP6ClientEndpoint`` in fewer steps. Twisted's connector starts each
    connection a reactor turn later, watches the socket for reading and
    writing while it connects, calls ``connect`` twice, takes the socket out
    of epoll and puts it back once connected, and sends zero bytes when the
    event that said so also said writable: five epoll changes, two
    ``FIONBIO`` and a ``sendto`` more than needed, for every backend
    connection (a login's). Here a socket made non-blocking connects at
    once, is watched for writing only until connected, then handed to a
    TCP transport that reads. Errors are Twisted's connection errors, a
    connection that takes longer than ``timeout`` fails with
    ``TCPTimedOutError``, and cancelling the Deferred closes the socket."""

    def __init__(self, reactor: Any, host: str, port: int, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        info = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0,
                                  socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)[0]
        self.family, self.address = info[0], info[4]
        self.peer = (IPv6Address if self.family == socket.AF_INET6 else IPv4Address)(
            "TCP", str(self.address[0]), port)

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(self.peer)
        if protocol is None:  # as Twisted's endpoints say it
            return fail(error.NoProtocol())
        try:
            sock = socket.socket(self.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC)
        except OSError as e:
            return fail(error.ConnectBindError(e.errno, e.strerror))
        return _Connecting(self, sock, protocol).start()


class _Outgoing(tcp.Connection):
    """A connected client socket's transport (what ``tcp.Client`` is once
    connected, without its connector)."""

    _tlsClientDefault = True  # startTLS on it speaks as the client

    def __init__(self, sock: Any, protocol: Any, reactor: Any, peer: Any) -> None:
        super().__init__(sock, protocol, reactor)
        self._peer = peer
        self.connected = 1
        self.logstr = "backend,client"

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        host, port = self.socket.getsockname()[:2]
        return type(self._peer)("TCP", host, port)

    def logPrefix(self) -> str:
        return self.logstr


class _Connecting:
    """A socket while it connects, as the reactor sees it: watched for
    writing (connected, or failed) until then."""

    def __init__(self, endpoint: AddressEndpoint, sock: Any, protocol: Any) -> None:
        self.endpoint = endpoint
        self.reactor = endpoint.reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol = protocol
        self.watched = False
        self.timer: Any = None
        self.result: Deferred[Any] = Deferred(lambda _: self._end())

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "connecting"

    def start(self) -> Deferred[Any]:
        code = self.sock.connect_ex(self.endpoint.address)
        if code == 0:
            self._connected()
        elif code in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            self.watched = True
            self.reactor.addWriter(self)
            self.timer = self.reactor.callLater(self.endpoint.timeout, self._timed_out)
        else:
            self._failed(code)
        return self.result

    def doWrite(self) -> None:
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._failed(code)
        else:
            self._connected()

    def doRead(self) -> None:  # not watched for reading; here for the interface
        self.doWrite()

    def connectionLost(self, reason: Any) -> None:
        # The reactor saw an error or a hang-up on the socket.
        self._failed(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNREFUSED)

    def _end(self) -> None:
        """Stop watching and timing; close the socket unless it was handed on."""
        if self.watched:
            self.watched = False
            self.reactor.removeWriter(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self.protocol is not None:
            self.protocol = None
            self.sock.close()

    def _connected(self) -> None:
        protocol, sock = self.protocol, self.sock
        self.protocol = None  # handed on: not closed by _end
        self._end()
        transport = _Outgoing(sock, protocol, self.reactor, self.endpoint.peer)
        transport.startReading()
        try:
            protocol.makeConnection(transport)
        except Exception:
            # The protocol failed as it started (a TLS layer's set-up, say):
            # the connection is lost, and the caller told why.
            failed = Failure()
            transport.connectionLost(failed)
            self.result.errback(failed)
            return
        self.result.callback(protocol)

    def _failed(self, code: int) -> None:
        self._end()
        self.result.errback(error.getConnectError((code, os.strerror(code))))

    def _timed_out(self) -> None:
        self.timer = None
        self._end()
        self.result.errback(error.TCPTimedOutError())


# -- the PROXY protocol ---------------------------------------------------------

HEADER_TIMEOUT = 10.0  # a balancer sends its header at once


def trusted(address: Any, networks: Any) -> bool:
    """Whether a connection from ``address`` may speak for another: from a
    trusted network, or over a local (unix) socket."""
    host = getattr(address, "host", None)
    if host is None:
        return True
    ip = addresses.ip(host)
    return ip is not None and any(ip in net for net in networks)


class ProxyHeaderFactory:
    """Listens for connections that start with a load balancer's PROXY
    header (versions 1 and 2) and hands each to ``factory`` once the header
    is read, as if it came from the client the header names: front ends,
    throttling, audit and backends all see the real client. Connections from
    anywhere but ``networks`` are closed at once, unread; so are those whose
    header is malformed or does not arrive within :data:`HEADER_TIMEOUT`."""

    def __init__(self, factory: Any, networks: Any, reactor: Any) -> None:
        self.factory = factory
        self.networks = tuple(networks)
        self.reactor = reactor
        self.refused = 0

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()

    def logPrefix(self) -> str:
        return "PROXY header"

    def buildProtocol(self, address: Any) -> Any:
        if not trusted(address, self.networks):
            self.refused += 1
            return None  # Twisted closes the connection
        return _HeaderReader(self, address)


class _HeaderReader:
    """Reads the header, then gets out of the way: the real protocol is
    attached to the transport itself (no wrapper on the relay's path), with
    the transport's ``getPeer`` answering the client's address."""

    def __init__(self, owner: ProxyHeaderFactory, address: Any) -> None:
        self._owner = owner
        self._address = address
        self._buffer = b""
        self._timer: Any = None
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._timer = self._owner.reactor.callLater(HEADER_TIMEOUT, transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        from proxy.wire.proxyheader import BadHeader, parse

        self._buffer += data
        try:
            header, used = parse(self._buffer)
        except BadHeader:
            self._done()
            self.transport.abortConnection()
            return
        if header is None:
            return
        self._done()
        peer = self._address
        if header.source is not None:
            host, port = header.source
            peer = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
        protocol = self._owner.factory.buildProtocol(peer)
        if protocol is None:
            self.transport.loseConnection()
            return
        transport = self.transport
        transport.getPeer = lambda: peer  # what every layer above asks
        transport.protocol = protocol
        protocol.makeConnection(transport)
        rest = self._buffer[used:]
        self._buffer = b""
        if rest:
            protocol.dataReceived(rest)

    def _done(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Any = None) -> None:
        self._done()


# -- several processes on one port ------------------------------------------------


def listen_reusing_port(reactor: Any, endpoint: str, factory: Any) -> Any:
    """Listen on a ``tcp:`` or ``tcp6:`` endpoint string with SO_REUSEPORT
    set, so that other processes may listen on the same port; the kernel
    spreads new connections over them. Twisted's endpoints do not set it."""
    sock = listening_socket(endpoint, reuse_port=True)
    try:
        return reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
    finally:
        sock.close()  # the reactor holds its own copy


def listening_socket(endpoint: str, *, reuse_port: bool) -> Any:
    """A listening, non-blocking socket for a ``tcp:`` or ``tcp6:`` endpoint
    string (port, interface, backlog): for SO_REUSEPORT, and for the
    supervisor of several workers, which opens each once and hands it on."""
    import re

    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"{endpoint!r}: not a tcp: or tcp6: endpoint")
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", rest)]
    options: dict[str, str] = {}
    for i, part in enumerate(parts):
        name, equals, value = part.partition("=")
        if not equals and i == 0:
            name, value = "port", part
        elif not equals or name not in ("port", "interface", "backlog"):
            raise ValueError(f"{endpoint!r}: only port, interface and backlog "
                             f"are understood here, not {part!r}")
        options[name] = value
    port = int(options["port"])
    interface = options.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
    family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
        sock.listen(int(options.get("backlog", 50)))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
