"""Webhook deliveries on task.Clock, over the real SQLite store called
inline: backoff with jitter, order per user, marks only after a 2xx, the
signature a receiver checks, and the outbox writer's batches and bound.
The real daemon and a real receiver: tests/integration/test_webhooks.py."""

from __future__ import annotations

import hashlib
import hmac
import json

import attrs
import pytest
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, fail, succeed
from twisted.internet.task import Clock

from proxy.config import WebhookConfig
from proxy.daemon import webhooks
from proxy.daemon.webhooks import Counts, Deliverer, OutboxWriter, retry_delay, signature
from proxy.store import outbox
from proxy.store.sqlite import SQLiteStore
from proxy.threads import Threaded
from tests.unit.fakes import Inline

SECRET = b"s" * 32
HOOK = WebhookConfig(name="siem", url="https://siem.example/in", secret_file="/dev/null",
                     retry_initial=1.0, retry_max=60.0, timeout=5.0)


class Receiver:
    """Answers posts with the statuses it is given (then 200), noting each
    post's time, body and headers; ``hold`` keeps answers back."""

    def __init__(self, clock: Clock, statuses=()) -> None:
        self.clock = clock
        self.statuses = list(statuses)
        self.posts: list[tuple[float, dict, dict]] = []
        self.held: list[Deferred] = []
        self.hold = False

    def __call__(self, url, headers, body, timeout):
        self.posts.append((self.clock.seconds(), json.loads(body), headers))
        if self.hold:
            d = Deferred()
            self.held.append(d)
            return d
        status = self.statuses.pop(0) if self.statuses else 200
        if isinstance(status, Exception):
            return fail(status)
        return succeed(status)

    def users(self):
        return [(body["user"], body["n"]) for _, body, _ in self.posts]


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "store.sqlite3")
    yield s
    s.close()


def deliverer(clock, store, receiver, hook=HOOK, random=lambda: 1.0):
    counts = Counts()
    d = Deliverer(clock=clock, store=Threaded(store, Inline()), webhook=hook, secret=SECRET,
                  post=receiver, node="n1", counts=counts, random=random)
    return d, counts


def add(store, *events, webhook="siem", now=0.0):
    """Events (user, n) into the outbox, as the writer puts them."""
    store.add_events([(webhook, user, "authentication",
                       json.dumps({"id": f"{user}{n}", "event": "authentication", "user": user,
                                   "n": n})) for user, n in events], now)


def test_retries_back_off_doubling_up_to_the_maximum():
    assert [retry_delay(n, 1.0, 60.0, lambda: 1.0) for n in range(1, 9)] == [
        1, 2, 4, 8, 16, 32, 60, 60]
    # Jitter takes up to half off, never more.
    assert retry_delay(3, 1.0, 60.0, lambda: 0.0) == 2.0
    assert retry_delay(1000, 1.0, 60.0, lambda: 0.5) == 45.0


def test_a_failing_receiver_is_tried_again_with_backoff_until_it_answers_2xx(store):
    clock = Clock()
    receiver = Receiver(clock, [503, 500, DeferredTimeout(), 404])
    add(store, ("alice", 1))
    d, counts = deliverer(clock, store, receiver)
    d.start()
    clock.advance(0)
    for _ in range(40):
        clock.advance(0.5)
    # Due at 1, 3, 7 and 15 s (doubling from retry_initial; jitter off),
    # each found by the next look at the outbox (every IDLE_POLL).
    assert [t for t, _, _ in receiver.posts] == [0.0, 1.0, 3.0, 7.0, 15.0]
    assert counts.delivered == {"siem": 1}
    assert counts.failed == {("siem", "status_5xx"): 2, ("siem", "timeout"): 1,
                             ("siem", "status_4xx"): 1}
    assert store.outbox_stats() == {}
    # Nothing more is posted once delivered.
    clock.advance(100)
    assert len(receiver.posts) == 5


def test_a_users_events_arrive_in_order_while_others_go_on(store):
    clock = Clock()
    receiver = Receiver(clock, [503])  # alice's first fails once
    add(store, ("alice", 1), ("bob", 1), ("alice", 2), ("bob", 2), ("alice", 3))
    d, _ = deliverer(clock, store, receiver)
    d.start()
    clock.advance(0)
    # alice's first failed: bob's go on, alice's next wait for her retry.
    assert receiver.users() == [("alice", 1), ("bob", 1), ("bob", 2)]
    clock.advance(1.0)
    assert receiver.users()[3:] == [("alice", 1), ("alice", 2), ("alice", 3)]
    assert store.outbox_stats() == {}


def test_nothing_is_marked_delivered_before_its_2xx(store):
    clock = Clock()
    receiver = Receiver(clock)
    receiver.hold = True
    add(store, ("alice", 1))
    d, _ = deliverer(clock, store, receiver)
    d.start()
    clock.advance(0)
    assert len(receiver.posts) == 1
    assert store.outbox_stats()["siem"].waiting == 1
    # A daemon killed now leaves the event undelivered: a store of one node
    # forgets its claim at the next start, and it is posted again.
    store.forget_claims()
    d2, _ = deliverer(clock, store, Receiver(clock))
    d2.start()
    clock.advance(0)
    assert store.outbox_stats() == {}
    receiver.held[0].callback(200)  # the first daemon's answer, arriving late: harmless
    assert store.outbox_stats() == {}


def test_each_post_is_signed_over_its_timestamp_and_body(store):
    clock = Clock()
    clock.advance(1_800_000_000)
    receiver = Receiver(clock)
    add(store, ("alice", 1), now=clock.seconds())
    d, _ = deliverer(clock, store, receiver)
    d.start()
    clock.advance(0)
    [(_, body, headers)] = receiver.posts
    header = headers[webhooks.SIGNATURE_HEADER]
    fields = dict(part.split("=", 1) for part in header.split(","))
    assert fields["t"] == "1800000000"
    raw = json.dumps(body).encode()  # the stored body, as posted
    expected = hmac.new(SECRET, b"1800000000." + raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
    assert header == signature(SECRET, 1_800_000_000, raw)
    assert headers["Content-Type"] == "application/json"
    assert headers["Legacy-Auth-Proxy-Event"] == "authentication"


def test_an_idle_deliverer_is_woken_by_new_events_and_stops_cleanly(store):
    clock = Clock()
    receiver = Receiver(clock)
    d, _ = deliverer(clock, store, receiver)
    d.start()
    clock.advance(0)
    add(store, ("alice", 1))
    d.nudge()
    clock.advance(0)
    assert receiver.users() == [("alice", 1)]
    stopped = d.stop()
    assert stopped.called
    add(store, ("alice", 2))
    clock.advance(10)
    assert receiver.users() == [("alice", 1)]


@attrs.frozen
class Hook:
    name: str
    events: tuple[str, ...] = ("*",)


def test_the_writer_batches_a_turns_events_in_order_for_the_webhooks_that_want_them(store):
    clock = Clock()
    calls = []

    class Counting:
        def add_events(self, pending, now):
            rows = outbox.encode(pending)
            calls.append(len(rows))
            return succeed(store.add_events(rows, now))

    woken = []
    writer = OutboxWriter(clock=clock, store=Counting(), counts=Counts(),
                          webhooks=(Hook("all"), Hook("locks", ("lockout",))),
                          written=woken.append)
    for n in range(3):
        writer.add({"event": "authentication", "user": "alice", "n": n})
    writer.add({"event": "lockout", "user": "alice"})
    assert calls == []  # nothing on the sign-in's path
    clock.advance(OutboxWriter.DELAY)
    assert calls == [5]
    assert woken == [{"all", "locks"}]
    claimed = store.claim_events(("all",), "n", clock.seconds(), 30, 10)
    assert json.loads(claimed[0].body)["n"] == 0


def test_the_writer_keeps_events_in_order_while_the_store_fails_and_is_bounded(store, monkeypatch):
    from proxy.store import StoreUnavailable

    clock = Clock()
    down = [True]

    class Flaky:
        def add_events(self, pending, now):
            if down[0]:
                return fail(StoreUnavailable("down"))
            return succeed(outbox.Encoding(store).add_events(pending, now))

    counts = Counts()
    monkeypatch.setattr(OutboxWriter, "MAX_WAITING", 3)
    writer = OutboxWriter(clock=clock, store=Flaky(), webhooks=(Hook("all"),), counts=counts)
    for n in range(4):
        writer.add({"event": "authentication", "user": "alice", "n": n})
    assert counts.dropped == 1
    clock.advance(OutboxWriter.DELAY)
    assert writer.waiting == 3
    down[0] = False
    clock.advance(webhooks.STORE_RETRY)
    assert writer.waiting == 0
    bodies = []
    while claimed := store.claim_events(("all",), "n", clock.seconds(), 30, 10):
        bodies += [json.loads(e.body)["n"] for e in claimed]
        store.settle_events([e.seq for e in claimed], [], clock.seconds())
    assert bodies == [0, 1, 2]


def test_the_metrics_name_the_backlog_and_its_age(store):
    clock = Clock()
    clock.advance(1000)
    counts = Counts()
    add(store, ("alice", 1), now=900.0)
    housekeeping = webhooks.Housekeeping(clock=clock, store=Threaded(store, Inline()),
                                         webhooks=(HOOK,), counts=counts)
    Deferred.fromCoroutine(housekeeping.tick())
    families = {f.name: f for f in counts.families(clock.seconds(), ["siem"])}
    assert families["legacy_auth_proxy_webhook_backlog"].samples[0].value == 1
    assert families["legacy_auth_proxy_webhook_oldest_undelivered_seconds"].samples[0].value == 100
