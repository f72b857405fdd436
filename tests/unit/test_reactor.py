"""The daemon's reactor (proxy.reactor.Reactor) dispatches each ready
socket to its transport, and an exception out of one is logged without
ending the loop or touching the other connections. Run here as a reactor
of its own, turn by turn, beside the tests' global one."""

from __future__ import annotations

import socket
import subprocess
import sys

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from proxy.reactor import Reactor


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("a bug in a protocol")
        self.transport.write(data)


def turns(reactor: Reactor, until, limit: int = 200) -> None:
    for _ in range(limit):
        if until():
            return
        reactor.runUntilCurrent()
        reactor.doIteration(0.05)
    raise AssertionError("not reached")


def test_events_reach_their_transport_and_a_failing_one_is_logged():
    reactor = Reactor()
    port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(2)]
        for c in clients:
            c.setblocking(False)
        turns(reactor, lambda: len(reactor.getReaders()) >= 4)  # the port, the waker, two
        clients[0].sendall(b"boom")
        clients[1].sendall(b"hello")

        answers: list[bytes] = []

        def answered() -> bool:
            try:
                answers.append(clients[1].recv(100))
            except BlockingIOError:
                return False
            return True

        turns(reactor, answered)
        assert answers == [b"hello"]
        # Twisted's dispatch logs the exception (in the legacy log's way)
        # and drops that connection.
        assert any("a bug in a protocol" in str(e["failure"].value) for e in logged
                   if e.get("failure"))
        clients[1].sendall(b"again")
        answers.clear()
        turns(reactor, answered)
        assert answers == [b"again"]
    finally:
        globalLogPublisher.removeObserver(logged.append)
        for c in clients:
            c.close()
        port.stopListening()
        reactor.removeAll()
        reactor.waker.connectionLost(None)
        reactor._poller.close()


def test_the_program_runs_on_it_whatever_it_imports_next():
    # The command line tool stood in for: it imports ldaptor, which takes
    # the global reactor, and says which one that is.
    code = (
        "import sys, types\n"
        "cli = types.ModuleType('proxy.cli')\n"
        "def main():\n"
        "    import ldaptor.protocols.ldap.ldapclient\n"
        "    print(type(sys.modules['twisted.internet.reactor']).__qualname__)\n"
        "    return 0\n"
        "cli.main = main\n"
        "sys.modules['proxy.cli'] = cli\n"
        "from proxy.__main__ import main\n"
        "raise SystemExit(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Reactor"
