"""Webhooks in a fleet: two real daemons sharing one real PostgreSQL store
deliver to one real receiver, each event once, by one node, in order per
user; a node killed with SIGKILL mid-delivery leaves its claim, and the
other node delivers the event when the lease runs out. And the outbox's
contract (tests/unit/test_outbox_store.py) on PostgreSQL."""

from __future__ import annotations

import inspect
import shutil
import signal
import threading
import time
from collections import Counter

import pytest

from proxy.store.postgres import PostgresStore
from tests.conftest import wait_until
from tests.integration.conftest import PRIMARY
from tests.integration.test_directory_outage import ldap_bind
from tests.integration.test_webhooks import PLAIN, create, metrics, names_received, webhook_config
from tests.proxyd import ProxyDaemon, free_port
from tests.unit import test_outbox_store as contract
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.integration

# Every test of the contract: those that take only a store.
for _name, _test in vars(contract).items():
    if _name.startswith("test_") and list(inspect.signature(_test).parameters) == ["store"]:
        globals()[_name] = _test


@pytest.fixture
def store(postgres, unique):
    s = PostgresStore(postgres.create_database(unique("outbox")), password=postgres.password)
    yield s
    s.close()


def test_two_nodes_claiming_at_once_never_claim_the_same_event(postgres, unique):
    url = postgres.create_database(unique("claims"))
    stores = [PostgresStore(url, password=postgres.password) for _ in range(2)]
    try:
        stores[0].add_events([("siem", f"user{n % 7}", "e", "{}") for n in range(200)], 100.0)
        claimed: dict[str, list[int]] = {"a": [], "b": []}

        def drain(node: str, store: PostgresStore) -> None:
            while True:
                events = store.claim_events(("siem",), node, 200.0, 30.0, 5)
                if not events:
                    if not store.outbox_stats():
                        return
                    time.sleep(0.01)
                    continue
                claimed[node] += [e.seq for e in events]
                store.settle_events([e.seq for e in events], [], 101.0)

        threads = [threading.Thread(target=drain, args=(n, s), daemon=True) for n, s in zip("ab", stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        both = claimed["a"] + claimed["b"]
        assert sorted(both) == sorted(set(both)) and len(both) == 200
    finally:
        for s in stores:
            s.close()


@pytest.fixture
def fleet(slapd, postgres, tmp_path, unique):
    receiver = Receiver(tmp_path)
    receiver.start()
    database = postgres.create_database(unique("webhooks"))
    password_file = postgres.password_file(tmp_path)
    nodes = {}
    for name in "ab":
        folder = tmp_path / name
        folder.mkdir()
        if name == "b":  # every node holds the same pepper
            shutil.copy(tmp_path / "a" / "pepper", folder / "pepper")
            (folder / "pepper").chmod(0o600)
        port = free_port()
        node = ProxyDaemon(
            folder, slapd, {"ldap": {"protocol": "ldap", "realm": "cloud", **PLAIN}},
            store=f"  url: {database}\n  password_file: {password_file}\n  timeout: 3s",
            extra=f"metrics:\n  endpoint: tcp:{port}:interface=127.0.0.1\n"
                  + webhook_config(receiver))
        node.metrics_port = port
        node.start()
        nodes[name] = node
    yield nodes, receiver, (database, postgres.password)
    for node in nodes.values():
        if node.process.poll() is None:
            assert node.stop() == 0
    receiver.stop()


def delivered(node) -> float:
    return metrics(node).get('legacy_auth_proxy_webhook_deliveries_total{webhook="test"}', 0)


def test_each_event_is_delivered_once_by_one_node_in_order_per_user(fleet, slapd, unique):
    nodes, receiver, _ = fleet
    users = [unique("fleet") for _ in range(4)]
    for user in users:
        slapd.add_user(user, PRIMARY)
    # Events written by the command line of each node, and by each node's sign-ins.
    for round in range(4):
        for i, user in enumerate(users):
            create(nodes["ab"[i % 2]], user, [f"{user}-{round}"])
    for i, user in enumerate(users):
        assert ldap_bind(nodes["ab"[i % 2]], f"uid={user},{slapd.people_dn}", PRIMARY) == 0
    for user in users:
        assert wait_until(lambda: len(names_received(receiver, user)) == 4, timeout=60)
        assert names_received(receiver, user) == [f"{user}-{r}" for r in range(4)]
    assert wait_until(lambda: len([e for e in receiver.received("authentication")
                                   if e["user"] in users]) == 4, timeout=60)
    # Both nodes' own start events too: then nothing is left anywhere.
    assert wait_until(lambda: all(metrics(n).get(
        'legacy_auth_proxy_webhook_backlog{webhook="test"}') == 0 for n in nodes.values()),
        timeout=30)
    ids = Counter(e["id"] for e in receiver.received())
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]
    # Each delivery counted by the one node that made it.
    assert sum(delivered(n) for n in nodes.values()) == len(ids)
    assert receiver.bad_signatures == 0


def test_a_node_killed_mid_delivery_leaves_its_events_to_the_other(fleet, slapd, unique):
    nodes, receiver, (database, password) = fleet
    user = unique("killed")
    slapd.add_user(user, PRIMARY)
    receiver.hold()
    create(nodes["a"], user, ["k1", "k2"])
    assert wait_until(lambda: receiver.posts >= 1, timeout=30)
    # Whichever node is posting it (its claim names its process) is killed.
    posting = next(n for n in nodes.values() if n.process.pid in claimants(database, password))
    survivor = next(n for n in nodes.values() if n is not posting)
    posting.process.send_signal(signal.SIGKILL)
    posting.process.wait(30)
    receiver.release()
    # The lease (2 × timeout + 10 s) runs out, then the survivor posts it again.
    assert wait_until(lambda: names_received(receiver, user)[-1:] == ["k2"], timeout=90)
    got = names_received(receiver, user)
    assert [n for i, n in enumerate(got) if i == 0 or got[i - 1] != n] == ["k1", "k2"]
    assert delivered(survivor) >= 1


def claimants(database: str, password: str) -> set[int]:
    """The processes holding claims on the outbox (a claim names its node
    as host:pid:random)."""
    import psycopg

    with psycopg.connect(database, password=password) as conn:
        rows = conn.execute("SELECT claimed_by FROM outbox_lanes WHERE claimed_by IS NOT NULL"
                            ).fetchall()
    return {int(r[0].split(":")[1]) for r in rows}
