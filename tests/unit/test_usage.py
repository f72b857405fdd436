"""Last uses of app passwords through a store outage: kept, merged, bounded,
and written once the store answers (issue #22, item 3)."""

from __future__ import annotations

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from proxy.auth import usage
from proxy.auth.usage import UsageRecorder
from proxy.store import StoreError


class Store:
    def __init__(self) -> None:
        self.down = False
        self.rows: dict[str, tuple] = {}

    def record_use(self, id, at, address, protocol, count=1):
        if self.down:
            return fail(StoreError("the store does not answer"))
        last, _, _, total = self.rows.get(id, (0.0, None, "", 0))
        self.rows[id] = (max(last, at), address, protocol, total + count)
        return succeed(None)


def test_uses_during_an_outage_are_written_when_the_store_returns():
    clock, store = Clock(), Store()
    recorder = UsageRecorder(clock, store, interval=60)
    recorder.start()
    store.down = True
    for i in range(21):
        clock.advance(1)
        recorder.used("phone", clock.seconds(), f"192.0.2.{i}", "imap")
    recorder.used("printer", clock.seconds(), "192.0.2.99", "smtp")
    clock.advance(120)  # two flushes, both refused
    assert store.rows == {}
    assert recorder.failing and recorder.pending() == 2
    store.down = False
    clock.advance(60)
    assert store.rows == {"phone": (21.0, "192.0.2.20", "imap", 21),
                          "printer": (21.0, "192.0.2.99", "smtp", 1)}
    assert recorder.pending() == 0 and not recorder.failing


def test_a_kept_batch_merges_with_later_uses_and_the_last_use_wins():
    assert usage.merged((5.0, "a", "imap", 2), (9.0, "b", "smtp", 3)) == (9.0, "b", "smtp", 5)
    assert usage.merged((9.0, "b", "smtp", 3), (5.0, "a", "imap", 2)) == (9.0, "b", "smtp", 5)


def test_a_deleted_app_password_is_not_kept(monkeypatch):
    clock, store = Clock(), Store()
    recorder = UsageRecorder(clock, store, interval=60)
    store.down = True
    recorder.used("phone", 1.0, None, "imap")  # written at once, refused
    assert recorder.pending() == 1
    recorder.forget("phone")
    recorder.flush()
    assert recorder.pending() == 0


def test_the_batch_is_bounded(monkeypatch):
    monkeypatch.setattr(usage, "MAX_PENDING", 3)
    clock, store = Clock(), Store()
    recorder = UsageRecorder(clock, store, interval=60)
    store.down = True
    for i in range(5):
        recorder.used(f"ap{i}", 1.0, None, "imap")
    assert recorder.pending() == 3
    assert recorder.dropped == 2
    store.down = False
    recorder.flush()
    assert set(store.rows) == {"ap2", "ap3", "ap4"}
