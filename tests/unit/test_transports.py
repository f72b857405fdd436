"""hang_up: producers unregistered before the close, a deadline that
waits for a slow reader but not for a silent one, and an idle plain TCP
connection closed at the end of the reactor's turn; the endpoint that
connects to an address."""

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError, NoProtocol
from twisted.internet.task import deferLater
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from proxy.transports import CLOSE_GRACE, AddressEndpoint, hang_up, pending_output, tcp_endpoint


class Draining(StringTransport):
    """A transport whose unsent bytes the test sets (``dataBuffer``), as
    Twisted's TCP transport keeps them."""

    def __init__(self):
        super().__init__()
        self.dataBuffer = b""
        self.aborted = False
        self.unregistered_first = None

    def loseConnection(self):
        self.unregistered_first = self.producer is None
        super().loseConnection()

    def abortConnection(self):
        self.aborted = True
        self.connected = False


def test_the_producer_goes_before_the_close():
    transport = Draining()
    transport.registerProducer(object(), True)
    hang_up(transport, Clock())
    assert transport.disconnecting and transport.unregistered_first


def test_a_silent_peer_is_aborted_after_the_grace():
    clock = Clock()
    transport = Draining()
    hang_up(transport, clock)
    clock.advance(CLOSE_GRACE - 0.1)
    assert not transport.aborted
    clock.advance(0.1)
    assert transport.aborted


def test_a_slow_reader_gets_its_last_answer():
    clock = Clock()
    transport = Draining()
    transport.dataBuffer = b"x" * 3000
    hang_up(transport, clock)
    for left in (2000, 1000):
        transport.dataBuffer = b"x" * left
        clock.advance(CLOSE_GRACE)
        assert not transport.aborted
    clock.advance(CLOSE_GRACE)  # no progress since
    assert transport.aborted


def test_cancelled_when_the_connection_goes():
    clock = Clock()
    transport = Draining()
    deadline = hang_up(transport, clock)
    deadline.cancel()
    clock.advance(CLOSE_GRACE * 3)
    assert not transport.aborted and not clock.getDelayedCalls()


def test_pending_output_counts_tls_and_tcp_buffers():
    class TLS:
        _appSendBuffer = [b"ab", b"c"]
        transport = Draining()

    TLS.transport.dataBuffer = b"12345"
    TLS.transport.offset = 2
    TLS.transport._tempDataLen = 4
    assert pending_output(TLS()) == 3 + 3 + 4


def test_the_relays_tls_layer_delivers_large_and_small_writes_in_order(tmp_path):
    """RelayTLS (Twisted's buffering TLS layer, a chunk written whole and
    its records read out together), both ends in memory: what the server
    writes, large and small, arrives whole and in order; and Twisted still
    builds the class ``faster_tls`` swaps after STARTTLS."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
    from twisted.test.iosim import connectedServerAndClient

    from proxy.pki import make_pki
    from proxy.tls import RelayTLS, ServerTLS, client_options, faster_tls

    assert TLSMemoryBIOFactory.protocol is BufferingTLSTransport
    pki = make_pki(tmp_path / "pki")
    received = bytearray()

    class Reader(Protocol):
        def dataReceived(self, data):
            received.extend(data)

    server_factory = TLSMemoryBIOFactory(ServerTLS(pki.cert_file, pki.key_file), False,
                                         Factory.forProtocol(Protocol))
    server_factory.protocol = RelayTLS
    clock = server_factory._clock = Clock()  # small writes are gathered until its next turn
    client_factory = TLSMemoryBIOFactory(client_options("localhost", pki.ca_file.read_bytes()),
                                         True, Factory.forProtocol(Reader))
    client, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None))
    pump.flush()
    assert type(server) is RelayTLS
    chunks = [bytes([i % 251]) * size for i, size in enumerate((5, 300_000, 1, 70_000, 16_384))]
    for chunk in chunks:
        server.write(chunk)
        clock.advance(0)
        pump.flush()
    assert bytes(received) == b"".join(chunks)

    class Upgraded:
        protocol = BufferingTLSTransport.__new__(BufferingTLSTransport)

    faster_tls(Upgraded)
    assert type(Upgraded.protocol) is RelayTLS


class _Told(Protocol):
    def __init__(self, made):
        self.made = made
        self.lost = Deferred()

    def connectionMade(self):
        self.made.callback(self)

    def connectionLost(self, reason=None):
        self.lost.callback(None)


async def _connected_pair():
    """A real loopback TCP connection: the server's protocol, and the client socket."""
    made = Deferred()
    factory = Factory()
    factory.buildProtocol = lambda addr: _Told(made)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    server = await made
    await port.stopListening()
    return server, client


@pytest_twisted.ensureDeferred
async def test_an_idle_plain_tcp_connection_closes_by_the_end_of_the_turn():
    server, client = await _connected_pair()
    assert hang_up(server.transport, reactor) is None  # no deadline needed
    assert server.transport.connected  # not yet: callers may still act on it
    await server.lost
    client.settimeout(5)
    assert client.recv(10) == b""  # an orderly close (FIN), not a reset
    client.close()


@pytest_twisted.ensureDeferred
async def test_what_is_written_after_an_idle_hang_up_is_still_sent():
    server, client = await _connected_pair()
    hang_up(server.transport, reactor)
    server.transport.write(b"last words")
    await server.lost
    client.settimeout(5)
    received = b""
    while chunk := client.recv(100):
        received += chunk
    assert received == b"last words"
    client.close()


class _Echo(Protocol):
    def __init__(self):
        self.made = Deferred()
        self.received = b""

    def connectionMade(self):
        self.made.callback(self.transport)

    def dataReceived(self, data):
        self.received += data


async def _recv(sock):
    """What arrives next on a non-blocking socket, the reactor turning meanwhile."""
    for _ in range(500):
        try:
            return sock.recv(100)
        except BlockingIOError:
            await deferLater(reactor, 0.01)
    raise TimeoutError("nothing arrived")


def _listening():
    """A socket listening on a free loopback port (accepting only if asked)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    return server


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest_twisted.ensureDeferred
async def test_the_address_endpoint_connects_and_hands_a_tcp_transport_on():
    server = _listening()
    port = server.getsockname()[1]
    endpoint = tcp_endpoint(reactor, "127.0.0.1", port, 5)
    assert isinstance(endpoint, AddressEndpoint)
    client = _Echo()
    factory = Factory()
    factory.buildProtocol = lambda addr: client
    assert await endpoint.connect(factory) is client
    transport = client.transport
    assert transport.connected and transport.getPeer().port == port
    assert transport.getHost().host == "127.0.0.1"
    accepted, _ = server.accept()
    accepted.setblocking(False)
    transport.write(b"hello")
    assert await _recv(accepted) == b"hello"
    accepted.sendall(b"back")
    while client.received != b"back":
        await deferLater(reactor, 0.01)
    transport.loseConnection()
    assert await _recv(accepted) == b""
    accepted.close()
    server.close()


@pytest_twisted.ensureDeferred
async def test_the_address_endpoint_fails_as_twisteds_endpoints_do():
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()  # nothing listens there now
    before = _open_fds()
    with pytest.raises(ConnectionRefusedError):
        await tcp_endpoint(reactor, "127.0.0.1", port, 5).connect(Factory.forProtocol(Protocol))
    assert _open_fds() == before


@pytest_twisted.ensureDeferred
async def test_a_cancelled_connection_attempt_closes_its_socket():
    server = _listening()
    before = _open_fds()
    d = tcp_endpoint(reactor, "127.0.0.1", server.getsockname()[1], 5).connect(
        Factory.forProtocol(Protocol))
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert _open_fds() == before
    server.close()


class _Broken(Protocol):
    def connectionMade(self):
        raise ValueError("set-up failed")


@pytest_twisted.ensureDeferred
async def test_a_protocol_failing_as_it_starts_fails_the_connection_and_closes_it():
    server = _listening()
    before = _open_fds()
    with pytest.raises(ValueError):
        await tcp_endpoint(reactor, "127.0.0.1", server.getsockname()[1], 5).connect(
            Factory.forProtocol(_Broken))
    assert _open_fds() == before
    server.close()


@pytest_twisted.ensureDeferred
async def test_a_factory_with_no_protocol_fails_as_twisteds_endpoints_do():
    factory = Factory()
    factory.buildProtocol = lambda addr: None
    before = _open_fds()
    with pytest.raises(NoProtocol):
        await tcp_endpoint(reactor, "127.0.0.1", 9, 5).connect(factory)
    assert _open_fds() == before
