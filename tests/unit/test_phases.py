"""The front ends' phases and their tables of legal moves: the relaying
server (IMAP, POP3, submission), the LDAP session and the SMTP session after
AUTH. Each table is checked whole (every legal move is taken, every other
raises IllegalMove, every phase is reached from the first), then walked
through by real bytes."""

from __future__ import annotations

import pytest
from ldaptor.protocols import pureldap

from proxy.backends.ldap import BINDINGS, Binding, DirectorySession
from proxy.frontends.base import (
    CONNECTION_MOVES,
    PHASES,
    Connection,
    IllegalMove,
    Moves,
    Phase,
)
from proxy.frontends.ldap import BINDS, Bind, Forget, Identity, LDAPSession
from proxy.frontends.smtp import READING, AfterAuth, Reading
from proxy.wire import ber
from tests.unit.test_frontends import LOGINS, connect, core, settle  # noqa: F401 (core: a fixture)


def ldap_session() -> LDAPSession:
    return LDAPSession(tls=False, starttls=True, max_before_bind=4096, max_after_bind=1 << 20,
                       max_depth=32)


class _Server:
    """What a relaying server's phase is moved through, without the rest."""

    def __init__(self):
        from proxy.frontends.base import RelayingServer

        self.server = RelayingServer.__new__(RelayingServer)

    @property
    def phase(self):
        return self.server.phase

    @phase.setter
    def phase(self, value):
        self.server.phase = value

    def move(self, event):
        self.server._move(event)


class _Session:
    def __init__(self):
        self.session = ldap_session()

    @property
    def phase(self):
        return self.session.phase

    @phase.setter
    def phase(self, value):
        self.session.phase = value

    def move(self, event):
        self.session._move(event)


class _Guard:
    def __init__(self):
        self.guard = AfterAuth()

    @property
    def phase(self):
        return self.guard.reading

    @phase.setter
    def phase(self, value):
        self.guard.reading = value

    def move(self, event):
        self.guard._move(event)


class _Connection:
    def __init__(self):
        from proxy.frontends.ldap import LDAPServer

        self.server = LDAPServer.__new__(LDAPServer)

    @property
    def phase(self):
        return self.server.phase

    @phase.setter
    def phase(self, value):
        self.server.phase = value

    def move(self, event):
        self.server._move(event)


class _DirectorySession:
    def __init__(self):
        self.session = DirectorySession(opener=None, clock=None, timeout=1.0,
                                        on_frame=None, on_lost=None, on_connected=None)

    @property
    def phase(self):
        return self.session.phase

    @phase.setter
    def phase(self, value):
        self.session.phase = value

    def move(self, event):
        self.session._move(event)


MACHINES = {
    "relaying server": (PHASES, Phase, Phase.NEW, _Server),
    "LDAP session": (BINDS, Bind, Bind.UNBOUND, _Session),
    "SMTP after AUTH": (READING, Reading, Reading.COMMAND, _Guard),
    "LDAP connection": (CONNECTION_MOVES, Connection, Connection.NEW, _Connection),
    "directory session": (BINDINGS, Binding, Binding.LAZY, _DirectorySession),
}


@pytest.mark.parametrize("name", MACHINES)
def test_every_legal_move_is_taken_and_every_other_raises(name):
    table, phases, first, machine = MACHINES[name]
    legal = {(phase, event): after for phase, event, after in table.legal()}
    for phase in phases:
        for event in sorted(table.events()):
            m = machine()
            m.phase = phase
            if (phase, event) in legal:
                m.move(event)
                assert m.phase is legal[phase, event], (phase, event)
            else:
                with pytest.raises(IllegalMove, match=event):
                    m.move(event)
                assert m.phase is phase  # an illegal move changes nothing
    assert machine().phase is first


@pytest.mark.parametrize("name", MACHINES)
def test_every_phase_is_reached_from_the_first(name):
    table, phases, first, _ = MACHINES[name]
    reached, frontier = {first}, [first]
    while frontier:
        phase = frontier.pop()
        for start, _, after in table.legal():
            if start is phase and after not in reached:
                reached.add(after)
                frontier.append(after)
    assert reached == set(phases)


def test_an_unknown_event_is_an_illegal_move():
    table = Moves("m", {Reading.COMMAND: {"go": Reading.MESSAGE}})
    with pytest.raises(IllegalMove, match="no move 'stop' from COMMAND"):
        table.after(Reading.COMMAND, "stop")
    with pytest.raises(IllegalMove):
        table.after(Reading.MESSAGE, "go")


# -- the relaying server, walked through by a client --------------------------------------


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_a_relaying_server_goes_from_login_to_relay_to_gone(core, protocol):
    secret = core.admin.create("alice", "phone").secret
    server, client, backend = connect(core, protocol)
    assert server.phase is Phase.BEFORE_LOGIN
    from twisted.internet.defer import Deferred

    login, _ = LOGINS[protocol]
    core.directory.gate = Deferred()  # the directory's check waits
    server.dataReceived(login("alice", "wrong"))
    settle(core)
    assert server.phase is Phase.LOGGING_IN
    gate, core.directory.gate = core.directory.gate, None
    gate.callback(None)
    settle(core)
    assert server.phase is Phase.BEFORE_LOGIN  # refused: the dialogue reads on
    server.dataReceived(login("alice", secret))
    settle(core)
    assert server.phase is Phase.RELAYING and backend.connections
    server.revoke("test")
    assert server.phase is Phase.CLOSING and client.disconnecting
    server.backend = None  # closed already; an in-memory transport refuses a second close
    server.connectionLost(None)
    assert server.phase is Phase.GONE


def test_the_guard_holds_and_releases_the_client(core):
    """SMTP after AUTH: a client whose bytes wait on the backend's answer
    past one read is not read until the backend answers."""
    from proxy.frontends.base import RELAY_READ_SIZE

    secret = core.admin.create("alice", "phone").secret
    server, client, backend = connect(core, "smtp")
    login, _ = LOGINS["smtp"]
    server.dataReceived(login("alice", secret))
    settle(core)
    (connection,) = backend.connections
    server.dataReceived(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
    server.dataReceived(b"x" * (RELAY_READ_SIZE + 1))  # the message, before the 354
    assert server.phase is Phase.HELD and client.producerState == "paused"
    connection.dataReceived(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
    assert server.phase is Phase.RELAYING and client.producerState == "producing"


def test_a_relaying_server_handed_back_by_the_kernel_relays_in_python(core):
    secret = core.admin.create("alice", "phone").secret
    server, client, backend = connect(core, "imap")
    server.dataReceived(LOGINS["imap"][0]("alice", secret))
    settle(core)
    # As if splice(2) had taken both sockets from Twisted.
    server.phase = Phase.IN_KERNEL
    client.unregisterProducer()
    backend.connections[0].transport.unregisterProducer()
    server.handed_back(b"")
    assert server.phase is Phase.RELAYING
    assert client.producer is backend.connections[0].transport
    with pytest.raises(IllegalMove):
        server.handed_back(b"")  # twice: a bug in the kernel's relay


# -- the LDAP session -------------------------------------------------------------------------


def _bind(id=1, name="alice", password="secret"):
    return pureldap.LDAPMessage(pureldap.LDAPBindRequest(dn=name.encode(), auth=password.encode()),
                                id=id).toWire()


def test_an_ldap_session_binds_fails_binds_again_and_closes():
    s = ldap_session()
    actions = s.feed(_bind())
    assert s.phase is Bind.BINDING and actions[0] == Forget(was_bound=False)
    s.bound(actions[1].message, ber.SUCCESS, "", Identity("primary", "uid=alice"))
    assert s.phase is Bind.BOUND
    actions = s.feed(_bind(2))
    assert s.phase is Bind.BINDING and actions[0] == Forget(was_bound=True)
    s.bound(actions[1].message, ber.INVALID_CREDENTIALS)
    assert s.phase is Bind.UNBOUND and s.identity is None
    s.feed(pureldap.LDAPMessage(pureldap.LDAPBindRequest(dn=b"alice", auth=b""), id=3).toWire())
    assert s.phase is Bind.UNBOUND  # refused by the session itself, at once
    s.feed(pureldap.LDAPMessage(pureldap.LDAPUnbindRequest(), id=4).toWire())
    assert s.phase is Bind.CLOSED
    s.close()
    assert s.phase is Bind.CLOSED


def test_an_ldap_bind_decided_when_none_was_asked_is_a_bug():
    s = ldap_session()
    message = ber.parse_message(_bind())
    with pytest.raises(IllegalMove):
        s.bound(message, ber.SUCCESS, "", Identity("primary", "uid=alice"))


def test_the_directory_connection_ends_starttls_through_a_method():
    s = ldap_session()
    s.directory_connected()
    start_tls = pureldap.LDAPMessage(pureldap.LDAPStartTLSRequest(), id=1).toWire()
    (reply,) = s.feed(start_tls)
    assert ber.parse_result_code(ber.parse_message(reply.data)) == ber.OPERATIONS_ERROR


# -- SMTP after AUTH, walked through by bytes -------------------------------------------------


def test_smtp_after_auth_reads_commands_messages_chunks_and_skips():
    guard = AfterAuth(chunking=True, max_line=64)
    guard.feed_client(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
    assert guard.reading is Reading.COMMAND  # DATA waits for its answer
    guard.feed_backend(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
    assert guard.reading is Reading.MESSAGE
    guard.feed_client(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert guard.reading is Reading.COMMAND
    guard.feed_backend(b"250 queued\r\n")
    guard.feed_client(b"x" * 100)
    assert guard.reading is Reading.SKIP_LINE
    guard.feed_client(b"xx\r\n")
    assert guard.reading is Reading.COMMAND
    guard.feed_client(b"BDAT 5\r\n123")
    assert guard.reading is Reading.SKIP_CHUNK  # no MAIL and RCPT since the message
    guard.feed_client(b"45")
    assert guard.reading is Reading.COMMAND
    guard.feed_client(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nBDAT 5 LAST\r\n12")
    guard.feed_backend(b"250 ok\r\n250 ok\r\n")
    assert guard.reading is Reading.CHUNK
    guard.feed_client(b"345")
    assert guard.reading is Reading.COMMAND


def test_a_354_to_a_message_is_a_bug_not_a_second_message():
    guard = AfterAuth()
    guard.reading = Reading.MESSAGE
    with pytest.raises(IllegalMove):
        guard._move("go_ahead")

