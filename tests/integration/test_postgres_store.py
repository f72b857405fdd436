"""The store's contract (tests/unit/test_store.py) against a real PostgreSQL,
and what only a shared database does: the change feed announced with
LISTEN/NOTIFY, and a schema checked, not silently applied."""

from __future__ import annotations

import inspect
import os
import threading
import time

import psycopg
import pytest

from proxy.store import SchemaOutdated, StoreError, StoreUnavailable
from proxy.store.postgres import MIGRATIONS, PostgresStore
from tests.unit import test_store as contract

# Every test of the contract: those that take only a store.
for _name, _test in vars(contract).items():
    if _name.startswith("test_") and list(inspect.signature(_test).parameters) == ["store"]:
        globals()[_name] = _test
create = contract.create


@pytest.fixture
def database(postgres, unique):
    return postgres.create_database(unique("db"))


@pytest.fixture
def store(postgres, database):
    s = PostgresStore(database, password=postgres.password)
    yield s
    s.close()


def test_two_stores_on_one_database_see_each_others_changes_at_once(postgres, database):
    a = PostgresStore(database, password=postgres.password)
    b = PostgresStore(database, password=postgres.password)
    heard = threading.Event()
    up = threading.Event()
    stop = threading.Event()
    listener = threading.Thread(target=b.listen, args=(heard.set, lambda ok: ok and up.set(), stop))
    listener.start()
    try:
        assert up.wait(10)
        record = create(a, user="alice", name="phone")
        started = time.monotonic()
        a.delete_app_password("alice", record.id, now=2000.0)
        assert heard.wait(5)
        assert time.monotonic() - started < 0.5
        assert [c.kind for c in b.changes_since(0)] == ["deleted"]
    finally:
        stop.set()
        listener.join(10)
        a.close()
        b.close()


def test_an_older_schema_is_checked_not_applied(postgres, database):
    with psycopg.connect(database, password=postgres.password, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute(MIGRATIONS[0])
        conn.execute("INSERT INTO app_passwords (id, username, name, lookup_key, password_hash,"
                     " created_at, created_by) VALUES ('a1', 'alice', 'phone', %s, %s, 1, 'cli')",
                     (os.urandom(32), contract.HASH))
    with pytest.raises(SchemaOutdated, match="run 'legacy-auth-proxy migrate'"):
        PostgresStore(database, password=postgres.password)
    migrated = PostgresStore(database, password=postgres.password, migrate=True)
    assert migrated.schema_version == len(MIGRATIONS)
    assert [a.id for a in migrated.list_app_passwords("alice")] == ["a1"]
    migrated.close()


def test_a_wrong_password_or_an_unreachable_server_is_a_clear_error(postgres, database):
    """A wrong password or database is configuration; a server that refuses
    the connection is an outage (StoreUnavailable), said at once, not after
    the pool's timeout."""
    with pytest.raises(StoreError) as refused:
        PostgresStore(database, password="wrong", timeout=3)
    assert "cannot connect" in str(refused.value) and "wrong" not in str(refused.value)
    assert not isinstance(refused.value, StoreUnavailable)
    with pytest.raises(StoreError, match="does not exist") as missing:
        PostgresStore(database.replace("?", "_missing?"), password=postgres.password,
                      timeout=3)
    assert not isinstance(missing.value, StoreUnavailable)
    nowhere = database.replace(f":{postgres.port}/", ":1/")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="the store cannot be reached"):
        PostgresStore(nowhere, password=postgres.password, timeout=30)
    assert time.monotonic() - started < 15  # refused at once; the pool would wait 30 s


def test_a_frozen_server_is_an_error_within_the_timeout_not_a_hang(postgres, database):
    import signal

    store = PostgresStore(database, password=postgres.password, timeout=2)
    store.list_app_passwords("alice")  # a pooled connection exists
    pid = int((postgres.data / "postmaster.pid").read_text().split()[0])
    children = [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    frozen = [pid, *children]
    for p in frozen:
        os.kill(p, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot be reached"):
            store.list_app_passwords("alice")
        assert time.monotonic() - started < 5
        started = time.monotonic()
        with pytest.raises(StoreError):  # known down: at once
            store.list_app_passwords("alice")
        assert time.monotonic() - started < 0.5
    finally:
        for p in frozen:
            os.kill(p, signal.SIGCONT)
    time.sleep(1.1)
    assert store.list_app_passwords("alice") == []  # back by itself
    store.close()
