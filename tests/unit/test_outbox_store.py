"""The store's outbox of events for webhooks: the contract every store keeps
(tests taking only ``store`` run here on SQLite, and on PostgreSQL in
tests/integration/test_webhooks_fleet.py): order per lane, claims and
leases, delivery marks only after a 2xx, retries, pruning."""

from __future__ import annotations

import json

import pytest

from proxy.store import OutboxStats
from proxy.store import outbox
from proxy.store.sqlite import SQLiteStore


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "store.sqlite3")
    yield s
    s.close()


def rows(*specs):
    """(webhook, lane, event) each, with a body naming them."""
    return [(w, lane, event, json.dumps({"event": event, "user": lane})) for w, lane, event in specs]


def test_a_lane_gives_its_next_event_only_after_the_one_before_is_delivered(store):
    store.add_events(rows(("siem", "alice", "a1"), ("siem", "bob", "b1"),
                          ("siem", "alice", "a2")), now=100.0)
    first = store.claim_events(("siem",), "n1", 100.0, 30.0, 10)
    assert [(e.lane, e.event) for e in first] == [("alice", "a1"), ("bob", "b1")]
    # Claimed: nothing more for anyone while the lease runs.
    assert store.claim_events(("siem",), "n2", 101.0, 30.0, 10) == []
    store.settle_events([first[0].seq], [], 102.0)
    second = store.claim_events(("siem",), "n1", 102.0, 30.0, 10)
    assert [(e.lane, e.event) for e in second] == [("alice", "a2")]


def test_a_failure_keeps_the_lane_waiting_until_its_retry_time(store):
    store.add_events(rows(("siem", "alice", "a1"), ("siem", "alice", "a2")), now=100.0)
    [event] = store.claim_events(("siem",), "n1", 100.0, 30.0, 10)
    store.settle_events([], [(event.seq, 160.0, "HTTP 503")], 101.0)
    assert store.claim_events(("siem",), "n1", 159.0, 30.0, 10) == []
    [again] = store.claim_events(("siem",), "n1", 160.0, 30.0, 10)
    assert (again.seq, again.event, again.attempts) == (event.seq, "a1", 1)


def test_a_claim_whose_lease_ran_out_is_claimed_again(store):
    store.add_events(rows(("siem", "alice", "a1")), now=100.0)
    [event] = store.claim_events(("siem",), "dead node", 100.0, 30.0, 10)
    assert store.claim_events(("siem",), "n2", 129.0, 30.0, 10) == []
    [again] = store.claim_events(("siem",), "n2", 130.0, 30.0, 10)
    assert again.seq == event.seq


def test_webhooks_have_lanes_of_their_own(store):
    store.add_events(rows(("siem", "alice", "a1"), ("desk", "alice", "a1")), now=100.0)
    [siem] = store.claim_events(("siem",), "n1", 100.0, 30.0, 10)
    [desk] = store.claim_events(("desk",), "n1", 100.0, 30.0, 10)
    assert (siem.webhook, desk.webhook) == ("siem", "desk")
    store.settle_events([], [(siem.seq, 1000.0, "timeout")], 101.0)
    store.settle_events([desk.seq], [], 101.0)
    assert store.outbox_stats() == {"siem": OutboxStats(1, 100.0)}


def test_delivered_events_are_pruned_after_a_while_undelivered_ones_at_give_up(store):
    store.add_events(rows(("siem", "alice", "a1"), ("siem", "bob", "b1"),
                          ("gone", "carol", "c1")), now=100.0)
    claimed = store.claim_events(("siem",), "n1", 100.0, 30.0, 10)
    store.settle_events([claimed[0].seq], [], 110.0)
    assert store.prune_events(105.0, {"siem": 50.0}, 50.0) == (0, 0)
    assert store.prune_events(111.0, {"siem": 50.0}, 101.0) == (1, 1)  # a1; gone's c1
    assert store.outbox_stats() == {"siem": OutboxStats(1, 100.0)}
    assert store.prune_events(111.0, {"siem": 101.0}, 101.0) == (0, 1)
    assert store.outbox_stats() == {}


def test_claims_of_a_daemon_killed_mid_delivery_are_forgotten_on_a_store_of_one_node(tmp_path):
    store = SQLiteStore(tmp_path / "s.sqlite3")
    store.add_events(rows(("siem", "alice", "a1")), now=100.0)
    store.claim_events(("siem",), "killed", 100.0, 30.0, 10)
    store.forget_claims()
    assert [e.event for e in store.claim_events(("siem",), "n2", 101.0, 30.0, 10)] == ["a1"]
    store.close()


def test_an_event_goes_to_the_webhooks_that_want_it_with_one_id():
    class Hook:
        def __init__(self, name, events):
            self.name, self.events = name, events

    record = {"time": "2026-12-07T05:00:00.000Z", "event": "authentication", "user": "alice"}
    found = outbox.rows(record, [Hook("all", ("*",)), Hook("changes", ("app_password_created",)),
                                 Hook("auth", ("authentication", "lockout"))])
    assert [(w, lane, event) for w, lane, event, _ in found] == [
        ("all", "alice", "authentication"), ("auth", "alice", "authentication")]
    bodies = [json.loads(b) for *_, b in found]
    assert bodies[0] == bodies[1]
    assert list(bodies[0]) == ["id", "time", "event", "user"]
    assert len(bodies[0]["id"]) == 32
    assert outbox.lane({"event": "daemon_started"}) == ""


def test_a_lane_whose_first_event_was_given_up_goes_on_with_its_next(store):
    store.add_events(rows(("siem", "alice", "a1")), now=100.0)
    store.add_events(rows(("siem", "alice", "a2")), now=200.0)
    [first] = store.claim_events(("siem",), "n1", 200.0, 30.0, 10)
    store.settle_events([], [(first.seq, 500.0, "HTTP 503")], 201.0)
    assert store.prune_events(150.0, {"siem": 150.0}, 150.0) == (0, 1)
    [next] = store.claim_events(("siem",), "n1", 202.0, 30.0, 10)
    assert (next.event, next.attempts) == ("a2", 0)
    assert store.outbox_stats() == {"siem": OutboxStats(1, 200.0)}


def test_an_event_marked_twice_moves_its_lane_once(store):
    # A lease that ran out: two nodes posted the same event and both mark it.
    store.add_events(rows(("siem", "alice", "a1"), ("siem", "alice", "a2"),
                          ("siem", "alice", "a3")), now=100.0)
    [a1] = store.claim_events(("siem",), "slow", 100.0, 30.0, 10)
    [again] = store.claim_events(("siem",), "n2", 131.0, 30.0, 10)
    assert again.seq == a1.seq
    store.settle_events([a1.seq], [], 132.0)
    [a2] = store.claim_events(("siem",), "n2", 132.0, 30.0, 10)
    store.settle_events([a1.seq], [], 133.0)  # the slow node's late mark
    assert store.claim_events(("siem",), "n3", 134.0, 30.0, 10) == []  # a2 still held
    store.settle_events([a2.seq], [], 135.0)
    assert [e.event for e in store.claim_events(("siem",), "n3", 135.0, 30.0, 10)] == ["a3"]
