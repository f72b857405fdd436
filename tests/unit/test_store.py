import os
import sqlite3

import pytest

from proxy.store import LimitReached, MfaState, NameTaken, SchemaTooNew, User
from proxy.store.sqlite import MIGRATIONS, SQLiteStore

HASH = "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaA"


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "store.sqlite3")
    yield s
    s.close()


def create(store, user="alice", name="phone", key=None, now=1000.0, limit=40, **kw):
    key = key or os.urandom(32)
    return store.create_app_password(
        username=user, name=name, lookup_key=key, password_hash=HASH,
        created_by="test", now=now, expires_at=kw.get("expires_at"),
        protocols=kw.get("protocols"), limit=limit,
    )


def test_a_new_store_is_private_and_at_the_latest_schema(tmp_path, store):
    assert store.schema_version == len(MIGRATIONS)
    assert os.stat(tmp_path / "store.sqlite3").st_mode & 0o777 == 0o600
    assert store.integrity_check() == "ok"


def test_create_find_and_list(store):
    key = os.urandom(32)
    record = create(store, key=key, protocols=frozenset({"imap", "smtp"}), expires_at=5000.0)
    assert record.protocols == {"imap", "smtp"}
    found, encoded = store.find_by_lookup_key(key)
    assert found == record and encoded == HASH
    assert store.find_by_lookup_key(os.urandom(32)) is None
    assert store.find_app_password("alice", record.id) == record
    assert store.find_app_password("alice", "phone") == record
    assert store.find_app_password("bob", "phone") is None
    assert store.list_app_passwords("alice") == [record]
    assert store.list_app_passwords("bob") == []


def test_names_are_unique_per_user_only(store):
    create(store, name="phone")
    with pytest.raises(NameTaken):
        create(store, name="phone")
    create(store, user="bob", name="phone")


def test_the_41st_is_refused_until_one_is_deleted(store):
    records = [create(store, name=f"device {i}") for i in range(40)]
    with pytest.raises(LimitReached) as raised:
        create(store, name="one too many")
    assert (raised.value.count, raised.value.limit) == (40, 40)
    assert len(store.list_app_passwords("alice")) == 40
    store.delete_app_password("alice", records[0].id, now=2000.0)
    create(store, name="one too many")
    # Other users have limits of their own.
    create(store, user="bob", name="device 0")


def test_delete_and_revoke_all_feed_the_change_log(store):
    a = create(store, name="a")
    b = create(store, name="b")
    c = create(store, user="bob", name="c")
    start = store.last_change()
    assert store.delete_app_password("alice", a.id, now=2000.0) == a
    assert store.delete_app_password("alice", a.id, now=2000.0) is None
    assert store.delete_app_password("alice", c.id, now=2000.0) is None  # bob's
    assert store.revoke_all("alice", now=2001.0) == [b]
    assert store.list_app_passwords("alice") == []
    assert store.list_app_passwords("bob") == [c]
    changes = store.changes_since(start)
    assert [(ch.username, ch.kind, ch.app_password_id) for ch in changes] == [
        ("alice", "deleted", a.id),
        ("alice", "revoked_all", None),
    ]


def test_record_use_and_replace_hash(store):
    key = os.urandom(32)
    record = create(store, key=key)
    store.record_use(record.id, at=3000.0, address="192.0.2.7", protocol="imap", count=3)
    found, _ = store.find_by_lookup_key(key)
    assert (found.last_used_at, found.last_used_address, found.last_used_protocol) == (
        3000.0, "192.0.2.7", "imap")
    assert found.use_count == 3
    new_hash = HASH.replace("t=1", "t=2")
    store.replace_hash(record.id, new_hash)
    assert store.find_by_lookup_key(key)[1] == new_hash


def test_users_default_to_disabled_and_keep_their_state(store):
    assert store.get_user("carol") == User("carol", MfaState.DISABLED, None)
    store.set_user(User("carol", MfaState.ENFORCED, 1234.0), now=1234.0)
    assert store.get_user("carol") == User("carol", MfaState.ENFORCED, 1234.0)
    assert store.changes_since(0)[-1].kind == "state_changed"


def test_the_schema_refuses_what_is_not_a_hash_or_key(store):
    with pytest.raises(sqlite3.IntegrityError):
        store.create_app_password(
            username="alice", name="x", lookup_key=b"short", password_hash=HASH,
            created_by="t", now=1.0, expires_at=None, protocols=None, limit=40)
    with pytest.raises(sqlite3.IntegrityError):
        store.create_app_password(
            username="alice", name="x", lookup_key=os.urandom(32), password_hash="plain",
            created_by="t", now=1.0, expires_at=None, protocols=None, limit=40)
    assert store.list_app_passwords("alice") == []


def test_a_store_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "s.sqlite3"
    SQLiteStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(SchemaTooNew):
        SQLiteStore(path)


def test_reopening_keeps_everything(tmp_path):
    path = tmp_path / "s.sqlite3"
    s = SQLiteStore(path)
    record = create(s)
    s.close()
    s = SQLiteStore(path)
    assert s.list_app_passwords("alice") == [record]
    s.close()
