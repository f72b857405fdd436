"""The directory's connection pools on a task.Clock: long queues drained in
flat stack depth, every waiter answered, no connection ever lost, whatever
fails and whenever (issue #22: one directory stall broke a node for good)."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from proxy.config import DirectoryConfig
from proxy.directory import Directory, DirectoryBusy, DirectoryUnavailable, Lender

TIMEOUT = 5.0
SIZE = 4
MANY = 5000


def depth() -> int:
    frame, n = sys._getframe(1), 0
    while frame is not None:
        frame, n = frame.f_back, n + 1
    return n


def run(coroutine) -> Deferred:
    return Deferred.fromCoroutine(coroutine)


def outcome(d: Deferred) -> str:
    """What a caller's Deferred came to (its failure handled)."""
    if not d.called:
        return "unanswered"
    box = []
    d.addBoth(box.append)
    result = box[0]
    if hasattr(result, "value"):
        return type(result.value).__name__
    return "ok"


# -- the lender alone -------------------------------------------------------------


def whole(lender: Lender) -> bool:
    return lender.idle() + lender.held() == lender.size


def test_a_long_queue_of_waiters_that_give_back_at_once_drains_flat():
    """The directory down: each waiter, handed a connection, gives it back at
    once. 5,000 of them drain in one call, at one stack depth, in order."""
    clock = MemoryReactorClock()
    lender = Lender(clock, "pool", ["c0", "c1", "c2", "c3"], TIMEOUT)
    held = [lender.acquire() for _ in range(SIZE)]
    held = [outcome_value(run(c)) for c in held]
    depths, order = [], []

    async def caller(i):
        connection = await lender.acquire()
        depths.append(depth())
        order.append(i)
        lender.release(connection)
        raise DirectoryUnavailable("down")

    callers = [run(caller(i)) for i in range(MANY)]
    assert lender.waiting == MANY
    for connection in held:
        lender.release(connection)
    assert Counter(outcome(d) for d in callers) == {"DirectoryUnavailable": MANY}
    assert order == list(range(MANY))
    assert max(depths) == min(depths)
    assert lender.idle() == SIZE and lender.held() == 0 and lender.waiting == 0


def outcome_value(d: Deferred):
    box = []
    d.addBoth(box.append)
    return box[0]


def test_waiters_time_out_as_busy_and_leave_the_pool_whole():
    clock = MemoryReactorClock()
    lender = Lender(clock, "pool", range(SIZE), TIMEOUT)
    held = [outcome_value(run(lender.acquire())) for _ in range(SIZE)]
    late = [run(lender.acquire()) for _ in range(500)]
    clock.advance(TIMEOUT)
    assert Counter(outcome(d) for d in late) == {"DirectoryBusy": 500}
    assert issubclass(DirectoryBusy, DirectoryUnavailable)
    assert lender.waiting == 0 and not clock.getDelayedCalls()
    for connection in held:
        lender.release(connection)
    assert lender.idle() == SIZE
    assert outcome(run(lender.acquire())) == "ok"


class Faulty(Lender):
    """Breaks the ``at``-th hand-off in the way ``how`` says."""

    def __init__(self, *args, at: int, how: str) -> None:
        super().__init__(*args)
        self.at, self.how, self.count = at, how, 0

    def _deliver(self, waiter) -> None:
        self.count += 1
        if self.count != self.at:
            return super()._deliver(waiter)
        if self.how == "raise before":
            raise RecursionError("maximum recursion depth exceeded")
        if self.how == "cancel before":
            waiter.deferred.cancel()
            return super()._deliver(waiter)
        if self.how == "deliver then raise":
            super()._deliver(waiter)
            raise RecursionError("maximum recursion depth exceeded")
        if self.how == "lost on the way":
            # The Deferred fires but its waiter does not wake to take it.
            self.stranded = waiter
            waiter.deferred.pause()
            super()._deliver(waiter)
            raise RecursionError("maximum recursion depth exceeded")
        raise AssertionError(self.how)


HOW = ["raise before", "cancel before", "deliver then raise", "lost on the way"]


@pytest.mark.parametrize("how", HOW)
def test_a_hand_off_broken_at_any_step_loses_no_connection(how):
    """For each hand-off in turn, broken in each way: every caller gets an
    answer, no two callers ever hold one connection, and once all is done
    every connection is back in the pool."""
    waiters = 40
    for at in range(1, waiters + SIZE + 1):
        clock = MemoryReactorClock()
        lender = Faulty(clock, "pool", [f"c{i}" for i in range(SIZE)], TIMEOUT, at=at, how=how)
        holders: Counter = Counter()

        async def caller(i):
            connection = await lender.acquire()
            holders[connection] += 1
            assert holders[connection] == 1, "two holders of one connection"
            try:
                if i % 3 == 0:
                    # Some give back at once (the directory is down), others
                    # later (an operation).
                    raise DirectoryUnavailable("down")
                wait = Deferred()
                clock.callLater(1.0, wait.callback, None)
                await wait
            finally:
                holders[connection] -= 1
                lender.release(connection)

        callers = [run(caller(i)) for i in range(waiters)]
        for d in callers:
            d.addErrback(lambda f: None)
        for _ in range(waiters + 2):
            clock.advance(1.0)
        clock.advance(TIMEOUT * 2)
        if how == "lost on the way" and lender.count >= at:
            # Its waiter wakes at last, to find that nothing is its own.
            assert [d.called for d in callers].count(False) == 1
            lender.stranded.deferred.unpause()
        assert all(d.called for d in callers), (at, how)
        assert whole(lender), (at, how)
        assert lender.held() == 0 and lender.idle() == SIZE, (at, how)
        assert outcome(run(lender.acquire())) == "ok"


def test_a_waiter_woken_after_its_hand_off_was_taken_back_uses_nothing():
    clock = MemoryReactorClock()
    lender = Faulty(clock, "pool", ["c0"], TIMEOUT, at=1, how="lost on the way")
    first = outcome_value(run(lender.acquire()))
    stranded_waiter = []
    d = run(lender.acquire())
    stranded_waiter.append(lender._waiting[0])
    lender.release(first)
    assert not d.called and lender.idle() == 1  # taken back
    mine = outcome_value(run(lender.acquire()))
    assert mine == "c0"
    stranded_waiter[0].deferred.unpause()
    assert outcome(d) == "DirectoryUnavailable"  # not a second holder of c0
    lender.release(mine)
    assert whole(lender) and lender.idle() == 1


def test_a_connection_held_far_too_long_is_a_problem():
    clock = MemoryReactorClock()
    lender = Lender(clock, "directory-bind", ["c0", "c1"], TIMEOUT)
    held = outcome_value(run(lender.acquire()))
    assert lender.problems() == []
    clock.advance(TIMEOUT * 2)
    assert lender.problems() == []  # connecting, then an operation: still normal
    clock.advance(TIMEOUT * 3)
    assert lender.problems() == ["directory-bind: 1 connection(s) held for more than 20 s"]
    lender.release(held)
    assert lender.problems() == []


# -- the directory's pools --------------------------------------------------------


class FakeTransport:
    def __init__(self, client):
        self.client = client

    def abortConnection(self):
        self.client.aborted = True


class FakeClient:
    """ldaptor's LDAPClient as the directory uses it for a password check."""

    def __init__(self, answer: str = "hang"):
        self.answer = answer
        self.transport = FakeTransport(self)
        self.aborted = False
        self.binds = 0

    def bind(self, dn, password):
        self.binds += 1
        if self.answer == "ok":
            return succeed(None)
        return Deferred()  # a stalled directory: never answers


@pytest.fixture
def directory(tmp_path):
    clock = MemoryReactorClock()
    config = DirectoryConfig(url="ldap://127.0.0.1:389", bind_dn="cn=proxy,dc=example,dc=test",
                             bind_password_file=tmp_path / "unused",
                             user_base="ou=people,dc=example,dc=test", timeout=TIMEOUT,
                             pool_size=SIZE)
    directory = Directory(clock, config, "secret", None)
    directory.clock = clock
    for connection in directory._bind._all:
        connect(connection, FakeClient("hang"))
    return directory


def connect(connection, client):
    """The connection up, with ``client``; and, as ClientService does, a
    dropped client reported lost on the next turn of the reactor."""
    connection.current = client
    clock = connection.pool.reactor

    def when_connected(failAfterFailures=None):
        if connection.current is None:
            return defer.fail(ConnectionError("gone"))
        return succeed(connection.current)

    connection.service.whenConnected = when_connected
    client.transport.abortConnection = lambda: clock.callLater(0, connection.lost, client)


def test_a_stall_under_thousands_of_waiters_answers_every_one(directory):
    """Issue #22: the directory stalls while 5,000 password checks wait for
    its four connections. When the operations time out, every waiter gets
    the temporary failure within the timeout, at one stack depth, and the
    pool keeps its four connections: once the directory answers again,
    checks succeed."""
    pool = directory._bind
    depths = []

    async def check(i):
        try:
            return await directory.check_password(f"uid=u{i},ou=people,dc=example,dc=test", "pw")
        except DirectoryUnavailable:
            depths.append(depth())
            raise

    checks = [run(check(i)) for i in range(MANY)]
    assert pool.lender.held() == SIZE and pool.lender.waiting == MANY - SIZE
    directory.clock.advance(TIMEOUT)
    directory.clock.advance(0)
    assert Counter(outcome(d) for d in checks) == {"DirectoryUnavailable": MANY}
    # The four whose operations timed out, then 4,996 woken one after the
    # other: a few frames apart, not one frame further for each waiter.
    assert max(depths) - min(depths) < 30, (min(depths), max(depths))
    assert pool.lender.idle() == SIZE and pool.lender.held() == 0
    assert directory.pool_problems() == []
    assert not directory.up() and directory.answering()  # the search pool was not asked

    # The directory answers again: the connections reconnect and serve.
    for connection in pool._all:
        connect(connection, FakeClient("ok"))
        pool.up(connection)
    after = [run(directory.check_password("uid=x,ou=people,dc=example,dc=test", "pw"))
             for _ in range(3 * SIZE)]
    assert [outcome(d) for d in after] == ["ok"] * (3 * SIZE)


def test_waiters_answered_when_the_directory_is_known_down(directory):
    """Connections gone and the pool known down: a queue of waiters behind
    the held connections is failed as the connections come back, at once."""
    pool = directory._bind
    checks = [run(directory.check_password("uid=a,ou=people,dc=example,dc=test", "pw"))
              for _ in range(MANY)]
    directory.clock.advance(TIMEOUT)  # the first four time out: the pool is down
    directory.clock.advance(0)
    assert Counter(outcome(d) for d in checks) == {"DirectoryUnavailable": MANY}
    assert pool.failing_since is not None
    late = [run(directory.check_password("uid=a,ou=people,dc=example,dc=test", "pw"))
            for _ in range(100)]
    assert Counter(outcome(d) for d in late) == {"DirectoryUnavailable": 100}
    assert pool.lender.idle() == SIZE


def test_a_busy_pool_is_not_an_unreachable_directory(directory):
    """Every connection busy with slow answers: the waiters get DirectoryBusy,
    and the directory still counts as answering (no outage grace)."""
    search = directory._search
    held = [outcome_value(run(search.acquire())) for _ in range(SIZE)]
    late = run(directory.resolve("alice"))
    directory.clock.advance(TIMEOUT)
    assert outcome(late) == "DirectoryBusy"
    assert directory.answering()
    search.down(held[0], "timed out")
    assert not directory.answering()
    for connection in held:
        search.release(connection)


def test_readiness_names_a_pool_that_cannot_serve(directory):
    """/health/ready: a connection held far longer than any operation may
    take makes the node not ready, whatever the directory does."""
    from types import SimpleNamespace

    from proxy.service import Daemon

    config = SimpleNamespace(listeners=[], directory=directory.config)
    daemon = SimpleNamespace(listeners=[], config=config, _reactor=directory.clock,
                             authenticator=None, directory=directory)
    assert Daemon.not_ready(daemon) == []
    held = outcome_value(run(directory._search.acquire()))
    directory.clock.advance(TIMEOUT * 5)
    assert directory.up()  # nothing failed: the pool alone is stuck
    assert Daemon.not_ready(daemon) == [
        "directory-search: 1 connection(s) held for more than 20 s"]
    directory._search.release(held)
    assert Daemon.not_ready(daemon) == []
