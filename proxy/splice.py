"""Relaying a session's bytes in the kernel, where both sides are plain TCP.

After login, an IMAP or POP3 session is bytes passed both ways unchanged.
Through Twisted, every chunk is copied from the kernel into a Python bytes
object, queued, re-joined and copied back, with an epoll change on each side
for every pause and resume. Here, ``splice(2)`` moves the bytes from one
socket into a pipe and from the pipe into the other socket without their
ever reaching Python; the reactor only watches readiness.

A pipe is held by a direction only while bytes wait in it (the other side
is slow to take them); otherwise it goes back to a small pool, so idle
sessions hold no pipe and no extra file descriptor. While bytes wait, the
source is not read: flow control is the kernel's socket buffers and the pipe.

Small chunks (an IMAP response line, a goodbye) are read into Python and
sent from there, so that the last words of the backend are known when it
closes (to tell a goodbye from a crash, as the relay in Python does).

The sockets stay where Twisted put them in epoll: while the kernel relays,
each transport's ``doRead`` and ``doWrite`` are the relay's (instance
attributes, as Twisted's own connector swaps them while it connects), and
reading and writing are switched with the transport's own calls. Taking
both sockets out of epoll at the start and putting them back at the end
cost four epoll changes a session.

The end of stream on either side ends the relay, and the transport reports
it to Twisted as its own ``doRead`` would: Twisted then loses the connection
as usual. An error Twisted sees on a socket loses that connection at once,
and its protocol stops the relay first. Anything else out of the ordinary
hands the session back to Twisted (:meth:`KernelRelay.stop`): a splice that
fails, the proxy itself having something to say (idle timeout, revocation,
shutdown), or a pipe that cannot be had. What waits in a pipe is then read
out and written through the transports, in order.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from typing import Any, Protocol

from twisted.internet import main
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger

from proxy.transports import idle_tcp

log = Logger(namespace="legacy_auth_proxy.relay")

# A pipe of 256 KiB moves a large message in few system calls, and bounds
# what a client that stops reading pins in the kernel (twice the relay's
# reads in Python); a kernel that refuses keeps its default of 64 KiB.
PIPE_SIZE = 256 * 1024
# Chunks up to this size are read into Python and sent from there (see above).
SMALL = 1024
TAIL = 512

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ETIMEDOUT,
         errno.EHOSTUNREACH, errno.ENETUNREACH)


def available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "splice")


def plain_tcp(transport: Any) -> bool:
    """Whether ``transport`` is a TCP connection without TLS, whose bytes
    Twisted holds nowhere (so that nothing can be overtaken)."""
    return idle_tcp(transport) and not ISSLTransport.providedBy(transport)


class Pipes:
    """Pipes kept for reuse, at most ``keep`` of them."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._free: list[tuple[int, int]] = []
        self.opened = 0

    def take(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except (OSError, AttributeError):
            pass  # the kernel's default size
        self.opened += 1
        return read, write

    def give(self, pipe: tuple[int, int]) -> None:
        """Back to the pool; only ever an empty pipe."""
        if len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            self.close(pipe)

    def close(self, pipe: tuple[int, int]) -> None:
        self.opened -= 1
        for fd in pipe:
            os.close(fd)


PIPES = Pipes()


class _Stopped(Exception):
    def __init__(self, ended: int | None = None) -> None:
        super().__init__()
        self.ended = ended  # the end whose stream ended (0: the client, 1: the backend)


class Owner(Protocol):
    """What the relay tells: bytes moved, and the session handed back, or
    ended by one side."""

    def relayed(self, index: int, count: int) -> None: ...

    def handed_back(self, backend_tail: bytes | None) -> None: ...

    def backend_ended(self, backend_tail: bytes | None) -> None: ...

    def client_ended(self, backend_tail: bytes | None) -> None: ...


class _End:
    """One side's transport while the kernel relays, and the bytes read
    from it that wait to be sent to the other end (its peer)."""

    __slots__ = ("relay", "transport", "socket", "fd", "peer", "index", "pipe", "in_pipe",
                 "held", "tail", "reading", "writing")

    def __init__(self, relay: KernelRelay, transport: Any, index: int) -> None:
        self.relay = relay
        self.transport = transport
        self.socket = transport.socket
        self.fd = transport.fileno()
        self.peer: _End = self
        self.index = index  # 0: the client (its bytes go to the backend), 1: the backend
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0  # bytes in the pipe, not yet sent to the peer
        self.held = b""  # bytes in Python, not yet sent to the peer (small chunks)
        # The backend's last small chunk(s); None after a large one, whose
        # end is not seen (then no goodbye of the proxy's is added).
        self.tail: bytes | None = b""
        self.reading = False
        self.writing = False

    # -- the reactor's side: the transport's doRead and doWrite while relaying -------

    def take(self) -> None:
        """Take the transport's reading and writing over, reading."""
        self.transport.doRead = self.doRead
        self.transport.doWrite = self.doWrite
        self.reading = True
        self.transport.startReading()  # nothing if it already reads

    def give_back(self) -> None:
        """Twisted's own doRead and doWrite again; still reading, not writing."""
        del self.transport.doRead
        del self.transport.doWrite
        if self.writing:
            self.writing = False
            self.transport.stopWriting()

    def doRead(self) -> Any:
        self.relay.run(self.readable)
        if self.relay.ended == self.index:
            return main.CONNECTION_DONE  # Twisted loses the connection, as on its own read
        return None

    def doWrite(self) -> None:
        self.relay.run(self.peer.flush)

    def want_read(self, on: bool) -> None:
        if on != self.reading and not self.relay.stopped:
            self.reading = on
            (self.transport.startReading if on else self.transport.stopReading)()

    def want_write(self, on: bool) -> None:
        if on != self.writing and not self.relay.stopped:
            self.writing = on
            (self.transport.startWriting if on else self.transport.stopWriting)()

    # -- bytes from this end to its peer ---------------------------------------------

    @property
    def waiting(self) -> bool:
        return bool(self.held or self.in_pipe)

    def readable(self) -> None:
        if self.waiting:  # a spurious wake-up: the peer has not taken the last chunk
            return
        pipe = self.pipe = self.pipe or self.relay.pipes.take()
        try:
            n = os.splice(self.fd, pipe[1], PIPE_SIZE, flags=_FLAGS)
        except BlockingIOError:
            self._release()
            return
        if n == 0:
            self._release()
            raise _Stopped(ended=self.index)
        self.relay.owner.relayed(self.index, n)
        if n <= SMALL:
            data = os.read(pipe[0], n)
            self._release()
            if self.index == 1:  # only the backend's last words are looked at
                self.tail = ((self.tail or b"") + data)[-TAIL:]
            self.held = data
        else:
            self.in_pipe = n
            self.tail = None  # unknown: the end of it is not seen
        self.flush()

    def flush(self) -> None:
        """Send what waits to the peer; while some still does, read no more."""
        if self.held:
            try:
                sent = self.peer.socket.send(self.held)
            except BlockingIOError:
                sent = 0
            self.held = self.held[sent:]
        while self.in_pipe:
            assert self.pipe is not None
            try:
                n = os.splice(self.pipe[0], self.peer.fd, self.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                break
            self.in_pipe -= n
        if self.waiting:
            self.want_read(False)
            self.peer.want_write(True)
        else:
            self._release()
            self.peer.want_write(False)
            self.want_read(True)

    def take_rest(self) -> bytes:
        """What still waits, out of the kernel; the pipe goes back (or, if
        it cannot be read, is closed)."""
        rest = self.held
        self.held = b""
        try:
            while self.in_pipe and self.pipe is not None:
                chunk = os.read(self.pipe[0], self.in_pipe)
                if not chunk:
                    break
                rest += chunk
                self.in_pipe -= len(chunk)
        except OSError:
            if self.pipe is not None:
                self.relay.pipes.close(self.pipe)
                self.pipe = None
        self.in_pipe = 0
        self._release()
        return rest

    def _release(self) -> None:
        if self.pipe is not None and not self.in_pipe:
            self.relay.pipes.give(self.pipe)
            self.pipe = None


class KernelRelay:
    """Relays between a client's and a backend's plain TCP transports until
    :meth:`stop`, then tells ``owner.handed_back`` (the owner relays in
    Python from there on), or ``owner.client_ended`` or
    ``owner.backend_ended`` when that side's stream ended (Twisted then
    loses that connection). ``owner.relayed(index, n)`` is told of every
    chunk: index 0 from the client, 1 from the backend."""

    __slots__ = ("reactor", "pipes", "owner", "stopped", "ended", "client", "backend")

    def __init__(self, reactor: Any, client: Any, backend: Any, owner: Owner,
                 pipes: Pipes = PIPES) -> None:
        self.reactor = reactor
        self.pipes = pipes
        self.owner = owner
        self.stopped = False
        self.ended: int | None = None  # the side whose stream ended, once one has
        self.client = _End(self, client, 0)
        self.backend = _End(self, backend, 1)
        self.client.peer = self.backend
        self.backend.peer = self.client

    def start(self, to_client: bytes = b"", to_backend: bytes = b"") -> None:
        """Take both transports' reading and writing over, first sending
        ``to_client`` and ``to_backend`` (the login's answer, bytes the
        client pipelined)."""
        for end in (self.client, self.backend):
            end.take()
        self.backend.held = to_client
        self.client.held = to_backend
        self.run(self.backend.flush)
        self.run(self.client.flush)

    def run(self, step: Any) -> None:
        if self.stopped:
            return
        try:
            step()
        except _Stopped as e:
            self.stop(ended=e.ended)
        except OSError as e:
            if e.errno not in _GONE:
                log.warn("kernel relay stopped: {error}", error=os.strerror(e.errno or 0))
            self.stop()

    def stop(self, ended: int | None = None) -> None:
        """Give both transports back to Twisted, with whatever still waits
        written through them, in order, and tell the owner: handed back, or
        (``ended`` 0 for the client, 1 for the backend) that side's stream
        ended, which Twisted is about to see or has seen."""
        if self.stopped:
            return
        self.stopped = True
        self.ended = ended
        for end in (self.client, self.backend):
            end.give_back()
        for end in (self.client, self.backend):
            try:
                rest = end.take_rest()
            except OSError:
                rest = b""
            if rest:
                end.peer.transport.write(rest)
        if ended == 1:
            self.owner.backend_ended(self.backend.tail)
        elif ended == 0:
            self.owner.client_ended(self.backend.tail)
        else:
            self.owner.handed_back(self.backend.tail)
