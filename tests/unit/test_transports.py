"""hang_up: producers unregistered before the close, and a deadline that
waits for a slow reader but not for a silent one."""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from proxy.transports import CLOSE_GRACE, hang_up, pending_output


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
