"""Floors: the least a Python process can spend on what the benchmarks time,
to set the proxy's CPU beside what CPython itself costs on this host.

    .venv/bin/python -m bench.floor imap-raw BACKEND_PORT
    .venv/bin/python -m bench.floor imap-twisted BACKEND_PORT
    .venv/bin/python -m bench.floor ldap-raw
    .venv/bin/python -m bench.floor ldap-twisted

Each prints its port, then serves until terminated. None decides anything,
audits, counts, times out or speaks TLS; none is a server to run.

``imap-raw`` is a warm IMAP login relayed with nothing but ``select.epoll``
and non-blocking sockets: it greets, reads the client's ``AUTHENTICATE
PLAIN`` line, connects to the backend, sends it the same line after the
backend's greeting, hands the backend's tagged answer to the client, then
copies bytes both ways (the client's LOGOUT) until either side hangs up.
The login that bench/load.py times, with fewer system calls than nginx's
mail proxy or the proxy make for it (no decision, no ``auth_http`` request,
no prepared pool) and the Python around them at its least.

``imap-twisted`` does the same with plain Twisted protocols, driven as
cheaply as the proxy drives Twisted: its reactor (``proxy.reactor``), its
connect (``AddressEndpoint``: fewer system calls than ``connectTCP``) and
its writes (``write_now``: sent at once, not through Twisted's write
queue) and its close (``hang_up``: at the end of the turn, without waiting
for the socket to be writable). What Twisted's transports and events cost
a login, before any of the proxy's own work (its decision, audit, limits,
timers and sessions).

``ldap-raw`` answers every simple bind with success from ``select.epoll``
and slicing of the BER frame: ldaptor's bare server (bench/ldaptor_server.py)
without its codec and its protocol classes. ``ldap-twisted`` does the same
in a plain Twisted protocol, driven as the proxy drives Twisted.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

GREETING = b"* OK floor ready\r\n"
IN, OUT, HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLHUP | select.EPOLLERR

# A session's states (imap-raw).
PREAUTH, CONNECTING, GREETED, AUTHENTICATING, RELAYING = range(5)


def _login_line(buffer: bytes) -> tuple[bytes, bytes, bytes]:
    """What a floor makes of a client's bytes before its login: (what stays
    buffered, the login line to pass on, the answer to send instead); the
    last two empty while the line is not whole."""
    end = buffer.find(b"\r\n")
    if end < 0:
        return buffer, b"", b""
    line = buffer[:end + 2]
    tag, _, command = line.partition(b" ")
    if command.upper().startswith(b"AUTHENTICATE PLAIN "):
        return b"", line, b""
    return b"", b"", tag + b" BAD the floor takes AUTHENTICATE PLAIN only\r\n"


def _tagged(buffer: bytes, tag: bytes) -> int:
    """Where the backend's answer tagged ``tag`` starts in ``buffer``; -1
    until it has come."""
    start = 0
    while (end := buffer.find(b"\r\n", start)) >= 0:
        if buffer.startswith(tag, start):
            return start
        start = end + 2
    return -1


def _accepted(listener: socket.socket) -> list[socket.socket]:
    """The connections waiting on ``listener``, made non-blocking."""
    clients = []
    while True:
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return clients
        client.setblocking(False)
        clients.append(client)


def _listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.setblocking(False)
    print(listener.getsockname()[1], flush=True)
    return listener


class _Session:
    __slots__ = ("client", "backend", "state", "buffer", "line", "tag")

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.backend: socket.socket | None = None
        self.state = PREAUTH
        self.buffer = b""
        self.line = b""
        self.tag = b""


def imap_raw(backend_port: int) -> None:
    listener = _listener()
    poller = select.epoll()
    poller.register(listener.fileno(), IN)
    # fd -> (session, True for the client's socket)
    owners: dict[int, tuple[_Session, bool]] = {}
    address = ("127.0.0.1", backend_port)

    def close(session: _Session) -> None:
        for sock in (session.client, session.backend):
            if sock is not None and sock.fileno() >= 0:
                if owners.pop(sock.fileno(), None) is not None:
                    poller.unregister(sock)
                sock.close()

    def send(session: _Session, sock: socket.socket | None, data: bytes) -> None:
        """All of ``data`` (a line or a few, which the kernel takes at
        once): a peer gone, or one not taking them, ends the session."""
        try:
            sock.sendall(data)  # type: ignore[union-attr]
        except OSError:
            close(session)

    def from_client(session: _Session, data: bytes) -> None:
        if session.state == RELAYING:
            send(session, session.backend, data)
            return
        if session.state != PREAUTH:
            return  # the floor's client waits for its answer
        session.buffer, line, refusal = _login_line(session.buffer + data)
        if refusal:
            send(session, session.client, refusal)
        if not line:
            return
        session.line, session.tag, session.state = line, line.partition(b" ")[0] + b" ", CONNECTING
        backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        session.backend = backend
        code = backend.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            close(session)
            return
        owners[backend.fileno()] = (session, False)
        poller.register(backend, OUT)

    def from_backend(session: _Session, data: bytes) -> None:
        if session.state == RELAYING:
            send(session, session.client, data)
            return
        session.buffer += data
        if session.state == GREETED:
            if b"\r\n" in session.buffer:
                session.buffer = b""
                session.state = AUTHENTICATING
                send(session, session.backend, session.line)
            return
        start = _tagged(session.buffer, session.tag)
        if start >= 0:
            send(session, session.client, session.buffer[start:])
            session.buffer, session.state = b"", RELAYING

    while True:
        for fd, event in poller.poll():
            if fd == listener.fileno():
                for client in _accepted(listener):
                    session = _Session(client)
                    owners[client.fileno()] = (session, True)
                    poller.register(client, IN)
                    send(session, client, GREETING)
                continue
            owner = owners.get(fd)
            if owner is None:
                continue
            session, is_client = owner
            if not is_client and session.state == CONNECTING:
                if event & HUP or session.backend.getsockopt(  # type: ignore[union-attr]
                        socket.SOL_SOCKET, socket.SO_ERROR):
                    close(session)
                else:
                    session.state = GREETED
                    poller.modify(fd, IN)
                continue
            sock = session.client if is_client else session.backend
            try:
                data = sock.recv(65536)  # type: ignore[union-attr]
            except BlockingIOError:
                continue  # an event of this poll for a closed socket whose number was reused
            except OSError:
                data = b""
            if not data:
                close(session)
            elif is_client:
                from_client(session, data)
            else:
                from_backend(session, data)


def imap_twisted(backend_port: int) -> None:
    from proxy.reactor import install

    reactor = install()
    from twisted.internet.protocol import Factory, Protocol

    from proxy.transports import AddressEndpoint, hang_up, write_now

    backend = AddressEndpoint(reactor, "127.0.0.1", backend_port, timeout=30)

    class Backend(Protocol):
        def __init__(self, front: Front) -> None:
            self.front = front
            self.greeted = False
            self.relaying = False
            self.buffer = b""

        def dataReceived(self, data: bytes) -> None:
            if self.relaying:
                write_now(self.front.transport, data)
                return
            self.buffer += data
            if not self.greeted:
                if b"\r\n" in self.buffer:
                    self.greeted, self.buffer = True, b""
                    write_now(self.transport, self.front.line)
                return
            start = _tagged(self.buffer, self.front.tag)
            if start >= 0:
                write_now(self.front.transport, self.buffer[start:])
                self.buffer, self.relaying = b"", True
                self.front.backend = self

        def connectionLost(self, reason: Any = None) -> None:
            hang_up(self.front.transport, reactor)

    class BackendFactory(Factory):
        def __init__(self, front: Front) -> None:
            self.front = front

        def buildProtocol(self, addr: Any) -> Backend:
            self.front.connecting = Backend(self.front)
            return self.front.connecting

    class Front(Protocol):
        backend: Backend | None = None  # once relaying
        connecting: Backend | None = None
        line = tag = b""
        buffer = b""

        def connectionMade(self) -> None:
            write_now(self.transport, GREETING)

        def dataReceived(self, data: bytes) -> None:
            if self.backend is not None:
                write_now(self.backend.transport, data)
                return
            if self.line:
                return  # waiting for the backend
            self.buffer, line, refusal = _login_line(self.buffer + data)
            if refusal:
                write_now(self.transport, refusal)
            if not line:
                return
            self.line, self.tag = line, line.partition(b" ")[0] + b" "
            backend.connect(BackendFactory(self)).addErrback(
                lambda _: self.transport.loseConnection())

        def connectionLost(self, reason: Any = None) -> None:
            other = self.backend or self.connecting
            if other is not None:
                hang_up(other.transport, reactor)

    factory = Factory.forProtocol(Front)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
    print(port.getHost().port, flush=True)
    reactor.run()


def _bind_answer(frame: bytes) -> bytes | None:
    """The success answer to the LDAP message ``frame`` if it is a bind
    request, None if it is anything else (an unbind: the floor hangs up).
    Its message ID is copied as it came."""
    at = 2 + (frame[1] & 0x7F if frame[1] & 0x80 else 0)  # past the SEQUENCE's header
    id_end = at + 2 + frame[at + 1]  # the INTEGER's tag, length and content
    if frame[id_end] != 0x60:  # [APPLICATION 0] BindRequest
        return None
    body = frame[at:id_end] + b"\x61\x07\x0a\x01\x00\x04\x00\x04\x00"
    return b"\x30" + bytes([len(body)]) + body


def _frames(buffer: bytearray) -> list[bytes]:
    """Whole BER frames taken off the front of ``buffer``."""
    frames = []
    while len(buffer) >= 2:
        size = buffer[1]
        head = 2
        if size & 0x80:
            count = size & 0x7F
            if len(buffer) < 2 + count:
                break
            size, head = int.from_bytes(buffer[2:2 + count], "big"), 2 + count
        if len(buffer) < head + size:
            break
        frames.append(bytes(buffer[:head + size]))
        del buffer[:head + size]
    return frames


def ldap_raw() -> None:
    listener = _listener()
    poller = select.epoll()
    poller.register(listener.fileno(), IN)
    connections: dict[int, tuple[socket.socket, bytearray]] = {}
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                for client in _accepted(listener):
                    connections[client.fileno()] = (client, bytearray())
                    poller.register(client, IN)
                continue
            if fd not in connections:
                continue
            client, buffer = connections[fd]
            try:
                data = client.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            buffer += data
            answers = [_bind_answer(frame) for frame in _frames(buffer)] if data else [None]
            if None not in answers:
                try:
                    if answers:
                        client.sendall(b"".join(answers))  # type: ignore[arg-type]
                    continue
                except OSError:
                    pass  # gone: closed below
            del connections[fd]
            poller.unregister(fd)
            client.close()


@contextlib.contextmanager
def running(kind: str, *arguments: object) -> Iterator[tuple[int, int]]:
    """A floor in a process of its own, while the block runs: its process
    ID and the port it listens on. Ended however the block ends, or if it
    never said its port."""
    process = subprocess.Popen([sys.executable, "-m", "bench.floor", kind, *map(str, arguments)],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        yield process.pid, int(process.stdout.readline())  # type: ignore[union-attr]
    finally:
        process.terminate()
        process.wait()


def ldap_twisted() -> None:
    from proxy.reactor import install

    reactor = install()
    from twisted.internet.protocol import Factory, Protocol

    from proxy.transports import hang_up, write_now

    class Binds(Protocol):
        def __init__(self) -> None:
            self.buffer = bytearray()

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            answers = [_bind_answer(frame) for frame in _frames(self.buffer)]
            if None in answers:
                hang_up(self.transport, reactor)
            elif answers:
                write_now(self.transport, b"".join(answers))  # type: ignore[arg-type]

    factory = Factory.forProtocol(Binds)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
    print(port.getHost().port, flush=True)
    reactor.run()


def main() -> None:
    kind = sys.argv[1]
    if kind == "imap-raw":
        imap_raw(int(sys.argv[2]))
    elif kind == "imap-twisted":
        imap_twisted(int(sys.argv[2]))
    elif kind == "ldap-raw":
        ldap_raw()
    elif kind == "ldap-twisted":
        ldap_twisted()
    else:
        sys.exit("usage: python -m bench.floor imap-raw|imap-twisted PORT | ldap-raw|ldap-twisted;"
                 f" not {kind}")


if __name__ == "__main__":
    main()
