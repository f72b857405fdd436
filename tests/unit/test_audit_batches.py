"""The daemon's audit batches: the events of a few milliseconds handed to the
audit thread in one step with no answer, in order, bounded, nothing lost at
stop, a reopen in its place among the events."""

import json

from twisted.internet.task import Clock

from proxy.audit import AuditLog
from proxy.config import AuditConfig
from proxy.daemon.auditing import GATHER, AuditBatches


class Reactor(Clock):
    def __init__(self):
        super().__init__()
        self.from_thread = 0

    def callFromThread(self, f, *args, **kwargs):
        self.from_thread += 1
        self.callLater(0, f, *args, **kwargs)


class Pool:
    """The audit pool's part the batches use: each call held until ``run``."""

    def __init__(self):
        self.calls = []
        self.refused = 0

    def start_soon(self, function):
        self.calls.append(function)

    def run(self):
        self.calls.pop(0)()


def batches(tmp_path, log_authentications=False):
    reactor = Reactor()
    reactor.advance(1794787200)
    pool = Pool()
    audit = AuditBatches(reactor, AuditLog(tmp_path / "audit.log", reactor.seconds), pool,
                         log_authentications)
    return reactor, pool, audit


def users(path):
    if not path.exists():
        return []
    return [json.loads(line)["user"] for line in path.read_text().splitlines()]


def test_the_events_of_one_turn_are_one_hand_off_with_no_answer(tmp_path):
    reactor, pool, audit = batches(tmp_path)
    audit.record("authentication", user="a", result="ok")
    audit.record("app_password_created", user="b")
    reactor.advance(0)
    assert len(pool.calls) == 1
    pool.run()
    assert users(tmp_path / "audit.log") == ["a", "b"]
    assert reactor.from_thread == 0


def test_under_load_the_events_are_handed_over_once_a_while(tmp_path):
    reactor, pool, audit = batches(tmp_path)
    audit.record("authentication", user="a")
    reactor.advance(0)  # after a quiet moment: at the end of its turn
    pool.run()
    for name in "bcd":  # the next turns, soon after: gathered
        audit.record("authentication", user=name)
        reactor.advance(GATHER / 4)
    assert pool.calls == []
    reactor.advance(GATHER / 4)
    assert len(pool.calls) == 1
    pool.run()
    assert users(tmp_path / "audit.log") == ["a", "b", "c", "d"]


def test_the_events_gathered_while_the_thread_writes_join_its_queue(tmp_path):
    reactor, pool, audit = batches(tmp_path, log_authentications=True)
    audit.record("authentication", user="a")
    reactor.advance(GATHER)
    for name in "bcd":  # three hand-overs while the audit thread has not run yet
        audit.record("authentication", user=name)
        reactor.advance(GATHER)
    assert len(pool.calls) == 1
    pool.run()
    assert users(tmp_path / "audit.log") == ["a", "b", "c", "d"]
    audit.record("authentication", user="e")  # the thread is idle again: started anew
    reactor.advance(GATHER)
    assert len(pool.calls) == 1
    pool.run()
    assert users(tmp_path / "audit.log") == ["a", "b", "c", "d", "e"]


def test_stop_writes_what_waits_and_fires_when_written(tmp_path):
    reactor, pool, audit = batches(tmp_path)
    audit.record("authentication", user="a")
    reactor.advance(GATHER)
    audit.record("authentication", user="b")
    written = audit.write()
    assert len(pool.calls) == 1
    pool.run()
    assert users(tmp_path / "audit.log") == ["a", "b"]
    assert not written.called
    reactor.advance(GATHER)  # the answer, through the reactor
    assert written.called
    reactor.advance(GATHER)
    assert pool.calls == []


def test_what_came_before_a_reopen_goes_to_the_file_before(tmp_path):
    reactor, pool, audit = batches(tmp_path)
    audit.record("authentication", user="a")
    reactor.advance(GATHER)
    audit.record("authentication", user="b")
    reopened = audit.reopen(AuditConfig(file=tmp_path / "new.log", log_authentications=False))
    audit.record("authentication", user="c")
    reactor.advance(GATHER)
    pool.run()
    reactor.advance(GATHER)
    assert reopened.called
    assert users(tmp_path / "audit.log") == ["a", "b"]
    assert users(tmp_path / "new.log") == ["c"]


def test_past_the_bound_events_are_dropped_and_counted(tmp_path):
    reactor, pool, audit = batches(tmp_path)
    audit.MAX_WAITING = 3
    audit.record("authentication", user="a")
    reactor.advance(GATHER)  # a slow disk: the thread does not run
    for name in "bcdef":
        audit.record("authentication", user=name)
    assert (audit.dropped, pool.refused) == (3, 3)
    reactor.advance(GATHER)
    pool.run()
    assert users(tmp_path / "audit.log") == ["a", "b", "c"]


def test_every_event_reaches_the_outbox_at_once(tmp_path):
    reactor, pool, audit = batches(tmp_path)
    seen = []
    audit.outbox = seen.append
    audit.record("authentication", user="a")
    audit.record("app_password_created", user="b")
    assert [r["user"] for r in seen] == ["a", "b"]


def test_a_write_that_fails_does_not_stop_the_next(tmp_path):
    reactor, pool, audit = batches(tmp_path)
    audit.audit.path = tmp_path / "missing" / "audit.log"
    audit.record("authentication", user="a")
    reactor.advance(GATHER)
    pool.run()
    reactor.advance(GATHER)  # the failure logged on the reactor thread
    audit.audit.path = tmp_path / "audit.log"
    audit.record("authentication", user="b")
    reactor.advance(GATHER)
    pool.run()
    assert users(tmp_path / "audit.log") == ["b"]
