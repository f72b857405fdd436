"""A session's connection to the directory (proxy/backends/ldap.py
DirectorySession) as its phase (Binding) moves: requests wait, in order,
for the bind the proxy makes itself, go out only as the identity they were
sent for, and a connection bound with the user's own password is never
re-bound. The directory is a fake whose binds finish when the test says."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from proxy.backends.ldap import Binding, DirectorySession, UpstreamRefused
from proxy.wire import ber

READER = "CN=LDAP Proxy,OU=Service Accounts,DC=ad,DC=example,DC=test"
USER = "CN=alice,OU=People,DC=ad,DC=example,DC=test"


class FakeUpstream:
    def __init__(self, binds):
        self.binds = binds  # the test's list of (dn, Deferred) binds under way
        self.bound_as = None
        self.closed = False
        self.sent = []

    async def bind(self, dn, password, clock, timeout):
        done = Deferred()
        self.binds.append((dn, done))
        await done
        self.bound_as = dn

    def send(self, frame):
        self.sent.append(frame)

    def close(self):
        self.closed = True


class Harness:
    def __init__(self):
        self.binds = []
        self.opened = []
        self.refused = []
        self.session = DirectorySession(
            opener=self.open, clock=None, timeout=1.0, on_frame=lambda f: None,
            on_lost=lambda: None, on_connected=lambda u: None)

    async def open(self, dn, password):
        upstream = FakeUpstream(self.binds)
        self.opened.append(upstream)
        await upstream.bind(dn, password, None, 1.0)
        return upstream

    def send(self, frame):
        self.session.send(frame, lambda code, text, fatal: self.refused.append(
            (frame, code, fatal)))

    def finish(self, error=None):
        dn, done = self.binds.pop(0)
        if error is None:
            done.callback(None)
        else:
            done.errback(error)
        return dn


def test_requests_wait_in_order_for_the_proxys_own_bind():
    h = Harness()
    h.session.want(READER, "pw", lazy=True)
    h.send(b"one")
    assert h.session.phase is Binding.PREPARING and h.session.busy
    h.send(b"two")
    assert h.finish() == READER
    assert h.session.phase is Binding.LAZY and not h.session.busy
    assert h.opened[0].sent == [b"one", b"two"] and h.refused == []
    h.send(b"three")  # bound as wanted: at once
    assert h.opened[0].sent[-1] == b"three" and h.binds == []


def test_requests_go_out_only_as_the_identity_they_were_sent_for():
    h = Harness()
    h.session.want(READER, "pw", lazy=True)
    h.send(b"as reader")
    h.session.want(None, "", lazy=True)  # the client binds again: anonymous meanwhile
    h.send(b"as nobody")
    assert h.finish() == READER
    assert h.finish() is None  # bound again, anonymously, for what waits as nobody
    assert h.opened[0].sent == [b"as nobody"]
    assert h.refused == [(b"as reader", ber.OPERATIONS_ERROR, False)]
    assert h.session.phase is Binding.LAZY


def test_a_connection_bound_with_the_users_password_is_never_rebound():
    h = Harness()
    d = Deferred.fromCoroutine(h.session.bind_as(USER, "secret"))
    h.finish()
    assert d.called
    h.session.want(USER, "", lazy=False)
    assert h.session.phase is Binding.PINNED
    h.send(b"search")
    assert h.opened[0].sent == [b"search"]
    h.opened[0].closed = True  # lost: the proxy has no password to bind again
    h.send(b"more")
    assert h.refused == [(b"more", ber.UNAVAILABLE, True)] and h.binds == []


def test_a_bind_that_fails_refuses_what_waited_and_the_next_request_tries_again():
    h = Harness()
    h.session.want(READER, "pw", lazy=True)
    h.send(b"one")
    h.finish(UpstreamRefused("no"))
    assert h.refused == [(b"one", ber.UNAVAILABLE, False)]
    assert h.session.phase is Binding.LAZY
    h.send(b"two")
    h.finish()
    assert h.opened[-1].sent == [b"two"]


def test_once_the_client_is_gone_nothing_is_opened():
    h = Harness()
    h.session.want(READER, "pw", lazy=True)
    h.send(b"one")
    h.session.end()
    h.finish()  # the connection opened meanwhile is closed at once
    assert h.opened[0].closed and h.opened[0].sent == []
    assert h.refused == [(b"one", ber.OPERATIONS_ERROR, False)]
    h.send(b"two")
    assert h.refused[-1] == (b"two", ber.UNAVAILABLE, False) and h.binds == []
    assert h.session.closed
