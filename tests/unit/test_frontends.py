"""Every front end in memory: bytes in, bytes out, on a task.Clock, with the
decision core of tests/unit/fakes.py, backends on in-memory transports, and
no socket. The same sessions against real servers and clients are in
tests/integration/."""

from __future__ import annotations

import base64

import pytest
from ldaptor.protocols import pureber, pureldap
from twisted.internet.testing import StringTransport

from proxy import protocols
from proxy.backends import BackendConnection, BackendRefused
from proxy.backends.ldap import UpstreamLDAP
from proxy.config import ListenerConfig
from proxy.backends.ldap import Upstream
from proxy.sessions import Sessions
from proxy.wire import ber
from tests.unit.fakes import Core

PRIMARY = "Primary-Passw0rd"
DECODER = pureldap.LDAPBERDecoderContext_TopLevel(
    inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
        fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
    )
)


class Client(StringTransport):
    """A client's transport that can say it is TLS (as after STARTTLS)."""

    def __init__(self, address="192.0.2.10"):
        from twisted.internet.address import IPv4Address

        super().__init__(peerAddress=IPv4Address("TCP", address, 40000))

    def take(self) -> bytes:
        data = self.value()
        self.clear()
        return data


class FakeMailBackend:
    """A backend that logs anyone in at once, on an in-memory connection."""

    hostname = "mail.example.test"
    extensions = [b"PIPELINING", b"CHUNKING"]

    def __init__(self, clock):
        self.clock = clock
        self.connections: list[BackendConnection] = []

    async def login(self, username, address, port):
        connection = BackendConnection(self.clock)
        connection.makeConnection(StringTransport())
        connection.username = username
        self.connections.append(connection)
        return connection


class FakeUpstream(Upstream):
    """The directory, as a session's own connection to it: in memory."""

    opened: list

    async def open(self, dn, password):
        upstream = UpstreamLDAP(self.reactor)
        upstream.makeConnection(StringTransport())
        self.opened.append((dn, upstream))
        return upstream


def listener_config(protocol, **settings):
    extra = {} if protocol == "ldap" else {
        "backend": f"{protocol}://127.0.0.1", "master_user": "m",
        "master_password_file": "/nonexistent"}
    return ListenerConfig(protocol=protocol, realm="cloud", endpoint="tcp:0", tls="none",
                          **{"allow_plaintext_auth": True, **extra, **settings})


@pytest.fixture
def core(tmp_path):
    core = Core(tmp_path)
    core.build()
    core.directory.add("alice", PRIMARY)
    core.sessions = Sessions(core.clock, core.directory, 1.0, core.auth)
    core.auth.sessions = core.sessions.registry
    core.auth.on_revoked(core.sessions.revoked)
    return core


def connect(core, protocol, **settings):
    entry = protocols.REGISTRY[protocol]
    config = listener_config(protocol, **settings)
    if entry.backend is None:
        backend = FakeUpstream(reactor=core.clock, config=core.auth._directory_config,
                               endpoint=None, start_tls=None, service_password="s")
        backend.opened = []
    else:
        backend = FakeMailBackend(core.clock)
    listener = entry.load("frontend")(reactor=core.clock, config=config, authenticator=core.auth,
                                      sessions=core.sessions, backend=backend, tls=None)
    server = listener.buildProtocol(None)
    client = Client()
    server.makeConnection(client)
    return server, client, backend


def settle(core):
    core.clock.advance(0)
    core.clock.advance(1)


# -- the mail front ends --------------------------------------------------------------------


LOGINS = {
    "imap": (lambda u, p: b"a LOGIN " + u.encode() + b' "' + p.encode() + b'"\r\n', b"a OK"),
    "pop3": (lambda u, p: b"USER " + u.encode() + b"\r\nPASS " + p.encode() + b"\r\n", b"+OK Logged in."),
    "smtp": (lambda u, p: b"EHLO c\r\nAUTH PLAIN " + base64.b64encode(f"\0{u}\0{p}".encode()) + b"\r\n",
             b"235 2.7.0"),
}
BYES = {"imap": b"* BYE", "pop3": b"-ERR [SYS/TEMP]", "smtp": b"421 4.7.0"}


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_a_login_is_decided_then_the_session_relayed(core, protocol):
    secret = core.admin.create("alice", "phone").secret
    server, client, backend = connect(core, protocol)
    login, ok = LOGINS[protocol]
    server.dataReceived(login("alice", secret))
    settle(core)
    assert ok in client.take()
    (connection,) = backend.connections
    assert connection.username == "alice"
    server.dataReceived(b"NOOP\r\n")
    assert connection.transport.value() == b"NOOP\r\n"
    connection.dataReceived(b"hello from the backend\r\n")
    assert client.take() == b"hello from the backend\r\n"


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_a_refusal_is_one_answer_and_no_backend_is_reached(core, protocol):
    server, client, backend = connect(core, protocol)
    login, ok = LOGINS[protocol]
    server.dataReceived(login("alice", "wrong"))
    settle(core)
    answer = client.take()
    assert ok not in answer and not backend.connections
    assert {"imap": b"AUTHENTICATIONFAILED", "pop3": b"-ERR [AUTH]", "smtp": b"535 5.7.8"}[protocol] in answer


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_deleting_the_app_password_ends_the_session(core, protocol):
    created = core.admin.create("alice", "phone")
    server, client, backend = connect(core, protocol)
    login, _ = LOGINS[protocol]
    server.dataReceived(login("alice", created.secret))
    settle(core)
    client.take()
    core.auth.apply(_deleted(created.record.id))
    assert client.take().startswith(BYES[protocol])
    assert client.disconnecting


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp", "ldap"])
def test_the_login_timeout_is_a_deadline_from_connect(core, protocol):
    server, client, _ = connect(core, protocol, login_timeout=10)
    for _ in range(20):  # a byte a second: a trickle does not move it
        core.clock.advance(1)
        if client.disconnecting:
            break
        server.dataReceived(b"N" if protocol != "ldap" else b"\x30")
    assert client.disconnecting


def _deleted(id):
    from proxy.store import Change

    return Change(seq=99, username="alice", kind="deleted", app_password_id=id, at=0.0)


# -- LDAP ----------------------------------------------------------------------------------------


def bind(id, name, password):
    return pureldap.LDAPMessage(pureldap.LDAPBindRequest(dn=name.encode(), auth=password.encode()),
                                id=id).toWire()


def messages(data):
    out = []
    while data:
        message, used = pureber.berDecodeObject(DECODER, data)
        out.append(message)
        data = data[used:]
    return out


# The directory's answers to a search: the user's entry with a password
# hash, and the service account's own entry.
ANSWERS = pureldap.LDAPMessage(pureldap.LDAPSearchResultEntry(
    objectName=b"uid=alice,ou=people,dc=example,dc=test",
    attributes=[(b"cn", [b"Alice"]), (b"userPassword", [b"{SSHA}x"])]), id=2).toWire() + \
    pureldap.LDAPMessage(pureldap.LDAPSearchResultEntry(
        objectName=b"cn=proxy,dc=example,dc=test", attributes=[(b"cn", [b"proxy"])]), id=2).toWire()


def test_ldap_binds_answers_and_identity(core):
    secret = core.admin.create("alice", "printer").secret
    server, client, upstream = connect(core, "ldap")
    server.dataReceived(bind(1, "alice", "wrong"))
    settle(core)
    server.dataReceived(bind(2, "alice", secret))
    settle(core)
    server.dataReceived(pureldap.LDAPMessage(pureldap.LDAPExtendedRequest(
        requestName=ber.WHO_AM_I.encode()), id=3).toWire())
    answers = messages(client.take())
    assert [m.value.resultCode for m in answers[:2]] == [49, 0]
    assert answers[2].value.response == b"dn:uid=alice,ou=people,dc=example,dc=test"
    assert not upstream.opened  # an app-password bind costs the directory nothing


def test_ldap_app_password_sessions_read_as_the_user_and_write_nothing(core):
    secret = core.admin.create("alice", "printer").secret
    server, client, upstream = connect(core, "ldap")
    server.dataReceived(bind(1, "alice", secret))
    settle(core)
    client.take()
    search = pureldap.LDAPMessage(pureldap.LDAPSearchRequest(baseObject=b"dc=example,dc=test"),
                                  id=2).toWire()
    server.dataReceived(search)
    settle(core)
    ((dn, connection),) = upstream.opened
    assert dn == "cn=proxy,dc=example,dc=test"
    (sent,) = messages(connection.transport.value())
    assert sent.controls[-1][0] == ber.PROXIED_AUTHORIZATION.encode()
    assert sent.controls[-1][2] == b"dn:uid=alice,ou=people,dc=example,dc=test"
    connection.dataReceived(ANSWERS)
    (got,) = messages(client.take())
    assert [a for a, _ in got.value.attributes] == [b"cn"]
    modify = pureldap.LDAPMessage(pureldap.LDAPModifyRequest(object=b"uid=alice", modification=[]),
                                  id=3).toWire()
    server.dataReceived(modify)
    assert messages(client.take())[0].value.resultCode == 50


def test_ldap_plaintext_and_anonymous_binds_are_the_cores_to_refuse(core):
    server, client, _ = connect(core, "ldap", allow_plaintext_auth=False)
    server.dataReceived(bind(1, "alice", PRIMARY))
    server.dataReceived(bind(2, "", ""))
    settle(core)
    assert [m.value.resultCode for m in messages(client.take())] == [13, 48]
    reasons = [e["reason"] for e in core.events if e["event"] == "authentication"]
    assert reasons == ["plaintext", "anonymous_refused"]


def test_ldap_malformed_bytes_end_only_that_connection(core):
    server, client, _ = connect(core, "ldap")
    other, other_client, _ = connect(core, "ldap")
    server.dataReceived(b"\x30\x03\x02\x01")  # shorter than it says, then nonsense
    server.dataReceived(b"\x01\x04")
    (notice,) = messages(client.take())
    assert notice.id == 0 and notice.value.resultCode == 2 and client.disconnecting
    other.dataReceived(bind(1, "alice", PRIMARY))
    settle(core)
    assert messages(other_client.take())[0].value.resultCode == 0


@pytest.mark.parametrize("protocol, goodbye", [
    ("ldap", b"\x30\x84\x7f\xff\xff\xff"),  # a message of 2 GiB: refused at once
    ("imap", None), ("pop3", None), ("smtp", None),  # None: the daemon stops
])
def test_after_the_goodbye_little_more_is_read(core, protocol, goodbye):
    """TLS reads on after the goodbye, for the client's close alert; a client
    that pours bytes in instead is read no further than AFTER_GOODBYE."""
    from proxy.transports import AFTER_GOODBYE

    server, client, _ = connect(core, protocol)
    paused = []
    client.pauseProducing = lambda: paused.append(True)  # StringTransport refuses once closing
    if goodbye is None:
        server.shut_down()
    else:
        server.dataReceived(goodbye)
    assert client.disconnecting and not paused
    server.dataReceived(b"\x15\x03\x03\x00\x1a" + b"x" * 26)  # what a close alert costs
    assert not paused
    sent = 0
    while not paused and sent < 100 * AFTER_GOODBYE:
        server.dataReceived(b"x" * 16384)
        sent += 16384
    assert paused and sent <= AFTER_GOODBYE + 16384


def test_answers_arriving_during_a_new_bind_are_still_filtered(core):
    """An app-password session's search is answered while the client has
    begun another bind: the answers are filtered by how the directory
    connection is bound, not by who the client is at that moment."""
    from twisted.internet.defer import Deferred

    secret = core.admin.create("alice", "printer").secret
    server, client, upstream = connect(core, "ldap")
    server.dataReceived(bind(1, "alice", secret))
    settle(core)
    server.dataReceived(pureldap.LDAPMessage(pureldap.LDAPSearchRequest(
        baseObject=b"dc=example,dc=test"), id=2).toWire())
    settle(core)
    client.take()
    ((_, connection),) = upstream.opened
    core.directory.gate = Deferred()  # the next bind's password check waits
    server.dataReceived(bind(3, "alice", PRIMARY))
    settle(core)
    connection.dataReceived(ANSWERS)
    (got,) = messages(client.take())
    assert [a for a, _ in got.value.attributes] == [b"cn"]
    core.directory.gate.callback(None)


# -- a backend login that fails --------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
@pytest.mark.parametrize("failure, bug", [
    (lambda: BackendRefused("NO [AUTHENTICATIONFAILED]"), False),
    (lambda: ConnectionRefusedError(111, "Connection refused"), False),
    (lambda: KeyError("capabilities"), True),  # a bug in the backend's login code
])
def test_a_backend_bug_is_logged_with_its_traceback(core, protocol, failure, bug):
    """A backend that refuses, or cannot be reached, is one warning; any
    other exception is a bug, logged as one with its traceback. Either way
    the client is told to try again later, and may."""
    from twisted.logger import LogLevel, globalLogPublisher

    secret = core.admin.create("alice", "phone").secret
    server, client, backend = connect(core, protocol)

    async def login(username, address, port):
        raise failure()

    backend.login = login
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        server.dataReceived(LOGINS[protocol][0]("alice", secret))
        settle(core)
    finally:
        globalLogPublisher.removeObserver(events.append)
    answer = client.take()
    assert {"imap": b"a NO [UNAVAILABLE]", "pop3": b"-ERR [SYS/TEMP]",
            "smtp": b"454 4.7.0"}[protocol] in answer
    assert not client.disconnecting
    mine = [e for e in events if e.get("log_namespace") == "legacy_auth_proxy.frontends"]
    (said,) = [e for e in mine if e["log_level"] >= LogLevel.warn]
    if bug:
        assert said["log_level"] is LogLevel.critical
        assert isinstance(said["log_failure"].value, KeyError)
        assert "Traceback" in said["log_failure"].getTraceback()
    else:
        assert said["log_level"] is LogLevel.warn and "log_failure" not in said
