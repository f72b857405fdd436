"""The daemon's audit batches: one hand-off to the audit thread for the
events of many reactor turns, in order, bounded, nothing lost at stop."""

import json

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from proxy.audit import AuditLog
from proxy.config import AuditConfig
from proxy.daemon.auditing import AuditBatches
from proxy.threads import Busy


class Pool:
    """The audit pool's part the batches use: each call held until ``run``."""

    def __init__(self):
        self.calls = []
        self.refused = 0

    def submit(self, function, *args):
        d = Deferred()
        self.calls.append((function, args, d))
        return d

    def run(self):
        function, args, d = self.calls.pop(0)
        d.callback(function(*args))


def batches(tmp_path, log_authentications=False):
    clock = Clock()
    clock.advance(1794787200)
    pool = Pool()
    audit = AuditBatches(clock, AuditLog(tmp_path / "audit.log", clock.seconds), pool,
                         log_authentications)
    return clock, pool, audit


def users(path):
    if not path.exists():
        return []
    return [json.loads(line)["user"] for line in path.read_text().splitlines()]


def test_the_events_of_one_turn_are_one_hand_off(tmp_path):
    clock, pool, audit = batches(tmp_path)
    audit.record("authentication", user="a", result="ok")
    audit.record("app_password_created", user="b")
    assert pool.calls == []
    clock.advance(0)
    assert len(pool.calls) == 1
    pool.run()
    assert users(tmp_path / "audit.log") == ["a", "b"]


def test_the_turns_that_pass_while_a_batch_is_written_go_in_the_next(tmp_path):
    clock, pool, audit = batches(tmp_path)
    audit.record("authentication", user="a")
    clock.advance(0)
    for name in "bcd":  # three turns while the first batch is on the audit thread
        audit.record("authentication", user=name)
        clock.advance(0)
    assert len(pool.calls) == 1
    pool.run()  # its answer hands the next batch over at once
    assert len(pool.calls) == 1
    pool.run()
    assert users(tmp_path / "audit.log") == ["a", "b", "c", "d"]
    clock.advance(0)
    assert pool.calls == []


def test_stop_writes_what_waits_behind_the_batch_on_its_way(tmp_path):
    clock, pool, audit = batches(tmp_path)
    audit.record("authentication", user="a")
    clock.advance(0)
    audit.record("authentication", user="b")
    written = audit.write()
    assert len(pool.calls) == 2
    pool.run()
    pool.run()
    assert written.called
    assert users(tmp_path / "audit.log") == ["a", "b"]
    clock.advance(0)
    assert pool.calls == []


def test_what_came_before_a_reopen_goes_to_the_file_before(tmp_path):
    clock, pool, audit = batches(tmp_path)
    audit.record("authentication", user="a")
    clock.advance(0)
    audit.record("authentication", user="b")
    audit.reopen(AuditConfig(file=tmp_path / "new.log", log_authentications=False))
    audit.record("authentication", user="c")
    while pool.calls:
        pool.run()
        clock.advance(0)
    assert users(tmp_path / "audit.log") == ["a", "b"]
    assert users(tmp_path / "new.log") == ["c"]


def test_past_the_bound_events_are_dropped_and_counted(tmp_path):
    clock, pool, audit = batches(tmp_path)
    audit.MAX_WAITING = 3
    audit.record("authentication", user="a")
    clock.advance(0)  # a slow disk: this batch does not come back
    for name in "bcdef":
        audit.record("authentication", user=name)
    assert (audit.dropped, pool.refused) == (2, 2)
    pool.run()
    pool.run()
    assert users(tmp_path / "audit.log") == ["a", "b", "c", "d"]


def test_every_event_reaches_the_outbox_at_once(tmp_path):
    clock, pool, audit = batches(tmp_path)
    seen = []
    audit.outbox = seen.append
    audit.record("authentication", user="a")
    audit.record("app_password_created", user="b")
    assert [r["user"] for r in seen] == ["a", "b"]


def test_a_refused_batch_does_not_stop_the_next(tmp_path):
    clock, pool, audit = batches(tmp_path)
    pool.submit = lambda function, *args: fail(Busy("audit: full"))
    audit.record("authentication", user="a")
    clock.advance(0)
    pool.submit = lambda function, *args: succeed(function(*args))
    audit.record("authentication", user="b")
    clock.advance(0)
    assert users(tmp_path / "audit.log") == ["b"]
