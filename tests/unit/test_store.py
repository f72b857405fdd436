import os
import sqlite3

import pytest

from proxy.store import (
    ApiToken,
    Conflict,
    LimitReached,
    MfaState,
    NameTaken,
    Reserved,
    SchemaOutdated,
    SchemaTooNew,
    StoreError,
    TokenNameTaken,
    User,
)
from proxy.store.sqlite import MIGRATIONS, SQLiteStore
from tests.conftest import at_once

HASH = "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaA"

# What a store raises for a row its schema refuses: each driver's own.
try:
    import psycopg

    REFUSED: tuple[type[Exception], ...] = (sqlite3.IntegrityError, psycopg.IntegrityError)
except ImportError:  # pragma: no cover
    REFUSED = (sqlite3.IntegrityError,)

# Tests taking only `store` are the contract every store keeps: they run
# here on SQLite and in tests/integration/test_postgres_store.py on PostgreSQL.


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
        protocols=kw.get("protocols"), limit=limit, networks=kw.get("networks"),
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
    with pytest.raises(REFUSED):
        store.create_app_password(
            username="alice", name="x", lookup_key=b"short", password_hash=HASH,
            created_by="t", now=1.0, expires_at=None, protocols=None, limit=40)
    with pytest.raises(REFUSED):
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


def _opened(path) -> str:
    SQLiteStore(path).close()
    return "opened"


def test_two_processes_opening_a_new_store_at_once_both_open_it(tmp_path):
    # The workers of one daemon on their first start: SQLite answers "locked"
    # at once to the second one switching the new file to WAL.
    for round in range(8):
        path = tmp_path / f"store-{round}.sqlite3"
        assert at_once(_opened, path) == ["opened", "opened"]
        assert SQLiteStore(path, migrate=False).schema_version == len(MIGRATIONS)


def test_reopening_keeps_everything(tmp_path):
    path = tmp_path / "s.sqlite3"
    s = SQLiteStore(path)
    record = create(s)
    s.close()
    s = SQLiteStore(path)
    assert s.list_app_passwords("alice") == [record]
    s.close()


def test_a_version_1_store_is_migrated_with_everything_kept(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
    db.execute("INSERT INTO app_passwords (id, username, name, lookup_key, password_hash,"
               " created_at, created_by) VALUES ('a1', 'alice', 'phone', ?, ?, 1.0, 'cli')",
               (b"k" * 32, HASH))
    db.commit()
    db.close()
    with pytest.raises(SchemaOutdated, match="run 'legacy-auth-proxy migrate'"):
        SQLiteStore(path, migrate=False)  # what `serve` does: checked, not applied
    store = SQLiteStore(path, migrate=True)
    assert store.schema_version == len(MIGRATIONS)
    [record] = store.list_app_passwords("alice")
    assert (record.id, record.networks, record.stopped_reason) == ("a1", None, None)
    store.close()


def test_networks_are_kept_and_checked(store):
    from proxy.store import check_networks

    record = create(store, networks=check_networks(("192.0.2.7/24", "2001:db8::/32")))
    assert record.networks == ("192.0.2.0/24", "2001:db8::/32")
    [listed] = store.list_app_passwords("alice")
    assert listed.networks == record.networks
    assert listed.allows_from("192.0.2.200") and listed.allows_from("::ffff:192.0.2.1")
    assert listed.allows_from("2001:db8::1") and not listed.allows_from("198.51.100.1")
    with pytest.raises(ValueError, match="not a network"):
        check_networks(("192.0.2.0/33",))


def test_stopped_ones_stay_listed_for_30_days_and_do_not_count(store):
    from proxy.store import STOPPED_KEPT

    create(store, name="printer", now=1000.0, expires_at=2000.0)
    create(store, name="idle", now=1000.0)
    used = create(store, name="used", now=1000.0)
    store.record_use(used.id, 9000.0, "192.0.2.1", "imap", 1)
    stopped = store.sweep(10_000.0, idle_expiry=5000.0)
    assert {(a.name, a.stopped_reason, a.stopped_at) for a in stopped} == {
        ("printer", "expired", 2000.0), ("idle", "unused", 6000.0)}
    assert [c.kind for c in store.changes_since(0)] == ["stopped", "stopped"]
    assert store.sweep(10_000.0, idle_expiry=5000.0) == []  # once
    # Stopped ones do not count towards the limit.
    create(store, name="new", now=10_000.0, limit=2)
    store.sweep(2000.0 + STOPPED_KEPT + 1, idle_expiry=None)
    assert {a.name for a in store.list_app_passwords("alice")} == {"idle", "used", "new"}
    store.sweep(6000.0 + STOPPED_KEPT + 1, idle_expiry=None)
    assert {a.name for a in store.list_app_passwords("alice")} == {"used", "new"}


def test_a_password_change_stops_the_older_working_ones(store):
    old = create(store, name="old", now=1000.0)
    create(store, name="expired", now=1000.0, expires_at=1500.0)
    create(store, name="new", now=3000.0)
    stopped = store.stop_created_before("alice", 2000.0, now=4000.0)
    assert [a.id for a in stopped] == [old.id]
    listed = {a.name: a for a in store.list_app_passwords("alice")}
    assert listed["old"].stopped(4000.0) == "password_change"
    assert listed["expired"].stopped(4000.0) == "expired"
    assert listed["new"].stopped(4000.0) is None


def test_a_totp_step_is_taken_once(store):
    assert store.get_totp("alice") is None
    assert store.add_totp("alice", b"sealed", step=100, now=1.0)
    assert not store.add_totp("alice", b"other", step=200, now=1.0)  # never replaced
    assert store.get_totp("alice") == (b"sealed", 100)
    assert not store.use_totp_step("alice", 100)  # the step that confirmed enrolment
    assert store.use_totp_step("alice", 101)
    assert not store.use_totp_step("alice", 101)
    assert not store.use_totp_step("alice", 99)
    assert not store.use_totp_step("bob", 500)
    assert store.delete_totp("alice", now=2.0) and store.get_totp("alice") is None
    assert store.changes_since(0)[-1].kind == "second_factor_reset"


def test_unlocking_goes_through_the_change_feed(store):
    store.note("alice", "unlocked", now=5.0)
    [change] = store.changes_since(0)
    assert (change.username, change.kind, change.app_password_id) == ("alice", "unlocked", None)


def test_checks_under_way_are_counted_by_every_process_sharing_the_store(store):
    """A secret about to be checked is counted first: at the limit, with
    failures and checks of every process, a new one is not checked."""
    limits = dict(window=900.0, limit=3, lockout=60.0, lockout_max=900.0)
    reserve = dict(window=900.0, limit=3)
    assert store.reserve_failure("uid=a", False, b"1" * 2, 1000.0, **reserve) is Reserved.NEW
    assert store.reserve_failure("uid=a", False, b"2" * 2, 1000.0, **reserve) is Reserved.NEW
    # The same guess: checked, but its row is the first check's (or its failure's).
    assert store.reserve_failure("uid=a", False, b"1" * 2, 1000.0, **reserve) is Reserved.COUNTED
    assert store.reserve_failure("uid=a", True, b"3" * 2, 1000.0, **reserve)  # elsewhere
    assert store.add_failure("uid=a", True, b"3" * 2, 1001.0, **limits) is None
    assert store.reserve_failure("uid=a", False, b"4" * 2, 1002.0, **reserve)
    assert store.reserve_failure("uid=a", False, b"5" * 2, 1002.0, **reserve) is Reserved.REFUSED
    store.release_failure("uid=a", False, b"2" * 2)  # that one was right
    assert store.reserve_failure("uid=a", False, b"5" * 2, 1003.0, **reserve)
    # A reserved wrong one becomes a failure, and the third locks.
    assert store.add_failure("uid=a", False, b"5" * 2, 1004.0, **limits) == 1064.0
    assert not store.reserve_failure("uid=a", False, b"1" * 2, 1005.0, **reserve)  # locked
    # A check that never came back counts until the window forgets it.
    assert store.reserve_failure("uid=b", False, b"1" * 2, 1000.0, window=900.0, limit=1)
    assert not store.reserve_failure("uid=b", False, b"2" * 2, 1500.0, window=900.0, limit=1)
    assert store.reserve_failure("uid=b", False, b"2" * 2, 1901.0, window=900.0, limit=1)


def test_a_sign_in_from_a_familiar_place_forgives_its_failures_in_the_store(store):
    limits = dict(window=900.0, limit=3, lockout=60.0, lockout_max=900.0)
    reserve = dict(window=900.0, limit=3)
    assert store.add_failure("uid=a", True, b"1" * 2, 1000.0, **limits) is None
    assert store.add_failure("uid=a", True, b"2" * 2, 1001.0, **limits) is None
    assert store.add_failure("uid=a", True, b"3" * 2, 1003.0, **limits) == 1063.0  # locked
    # Locked there: nothing forgiven.
    store.forgive_failures("uid=a", True, [b"3" * 2], 1010.0, 1010.0)
    assert not store.reserve_failure("uid=a", True, b"4" * 2, 1010.0, **reserve)
    assert store.add_failure("uid=a", True, b"5" * 2, 1070.0, **limits) is None
    assert store.add_failure("uid=a", True, b"6" * 2, 1071.0, **limits) is None
    store.forgive_failures("uid=a", True, [], 1080.0, 1080.0)  # nothing of its own: none go
    assert not store.reserve_failure("uid=a", True, b"7" * 2, 1080.0, window=900.0, limit=2)
    # The signing-in process forgives the ones it counted before it: 5 goes,
    # 6 (counted as it began) stays, and so would one only another counted.
    store.forgive_failures("uid=a", True, [b"5" * 2, b"6" * 2], 1071.0, 1090.0)
    assert store.add_failure("uid=a", True, b"7" * 2, 1091.0, **limits) is None  # two
    # The doubling starts over: the next lockout there is the first again.
    assert store.add_failure("uid=a", True, b"8" * 2, 1092.0, **limits) == 1152.0
    # Another process's failure at that place, and those elsewhere, are not forgiven.
    assert store.add_failure("uid=a", True, b"a" * 2, 1160.0, **limits) is None
    assert store.add_failure("uid=a", False, b"9" * 2, 1093.0, **limits) is None
    store.forgive_failures("uid=a", True, [b"9" * 2], 1200.0, 1200.0)
    assert not store.reserve_failure("uid=a", True, b"b" * 2, 1200.0, window=900.0, limit=1)
    assert store.add_failure("uid=a", False, b"0" * 2, 1201.0, **limits) is None
    assert store.add_failure("uid=a", False, b"1" * 2, 1202.0, **limits) == 1262.0


def test_failures_are_counted_by_every_process_sharing_the_store(store):
    limits = dict(window=900.0, limit=3, lockout=60.0, lockout_max=900.0)
    assert store.add_failure("uid=a", False, b"1" * 32, 1000.0, **limits) is None
    assert store.add_failure("uid=a", False, b"1" * 32, 1001.0, **limits) is None  # the same
    assert store.add_failure("uid=a", True, b"2" * 32, 1002.0, **limits) is None  # elsewhere
    assert store.add_failure("uid=a", False, b"3" * 32, 1003.0, **limits) is None
    assert store.add_failure("uid=a", False, b"4" * 32, 1004.0, **limits) == 1064.0
    assert store.lockouts(1005.0, "uid=a") == {"uid=a": {False: 1064.0}}
    assert store.changes_since(0)[-1].kind == "locked"
    # Still locked: another failure says until when, and counts nothing.
    assert store.add_failure("uid=a", False, b"9" * 32, 1010.0, **limits) == 1064.0
    for n, digest in enumerate((b"5", b"6", b"7")):  # locked again: twice as long
        until = store.add_failure("uid=a", False, digest * 32, 1100.0 + n, **limits)
    assert until == 1102.0 + 120.0
    assert store.lockouts(1103.0) == {"uid=a": {False: 1222.0}}
    assert store.add_failure("uid=a", False, b"8" * 32, 3000.0, **limits) is None  # old ones gone
    store.unlock("uid=a", 3001.0)
    assert store.lockouts(1005.0, "uid=a") == {}
    assert store.changes_since(0)[-1].kind == "unlocked"
    # The sweep forgets failures older than a day, whatever the window: with
    # a window of a year and a limit of two, the second failure would lock.
    long = dict(limits, window=365 * 86400.0, limit=2)
    store.add_failure("uid=b", False, b"1" * 32, 1000.0, **long)
    store.sweep(1000.0 + 86400.0 + 1, idle_expiry=None)
    assert store.add_failure("uid=b", False, b"2" * 32, 90000.0, **long) is None
    store.add_failure("uid=c", False, b"1" * 32, 1000.0, **long)
    assert store.add_failure("uid=c", False, b"2" * 32, 90000.0, **long) is not None  # unswept


def test_api_tokens_are_found_by_lookup_key_only_and_revoked(store):
    key = os.urandom(32)
    made = store.create_api_token(name="printers", lookup_key=key, scope="manage",
                                  created_by="cli:root", now=1000.0, expires_at=5000.0, rate=60)
    assert made == ApiToken("printers", "manage", 1000.0, "cli:root", 5000.0, 60)
    assert store.find_api_token(key) == made
    assert store.find_api_token(os.urandom(32)) is None
    store.record_api_token_use("printers", 1500.0)
    store.record_api_token_use("printers", 1200.0)  # a late write never goes back in time
    assert store.find_api_token(key).last_used_at == 1500.0
    other = store.create_api_token(name="desk", lookup_key=os.urandom(32), scope="read",
                                   created_by="cli:root", now=1100.0, expires_at=None, rate=600)
    assert [t.name for t in store.list_api_tokens()] == ["desk", "printers"]
    assert store.revoke_api_token("printers").name == "printers"
    assert store.revoke_api_token("printers") is None
    assert store.find_api_token(key) is None
    assert store.list_api_tokens() == [other]


def test_api_token_names_and_keys_are_unique_and_scopes_checked(store):
    key = os.urandom(32)
    store.create_api_token(name="a", lookup_key=key, scope="read", created_by="t", now=1.0,
                           expires_at=None, rate=600)
    with pytest.raises(TokenNameTaken):
        store.create_api_token(name="a", lookup_key=os.urandom(32), scope="read",
                               created_by="t", now=1.0, expires_at=None, rate=600)
    with pytest.raises(StoreError):
        store.create_api_token(name="b", lookup_key=key, scope="read", created_by="t", now=1.0,
                               expires_at=None, rate=600)
    with pytest.raises(REFUSED + (StoreError,)):
        store.create_api_token(name="c", lookup_key=os.urandom(32), scope="root",
                               created_by="t", now=1.0, expires_at=None, rate=600)


def test_every_users_app_passwords_in_pages_by_id(store):
    made = [create(store, user=f"user{i % 3}", name=f"device {i}") for i in range(7)]
    ids = sorted(r.id for r in made)
    first = store.page_app_passwords(None, 3)
    assert [r.id for r in first] == ids[:3]
    # One made and one deleted between pages change nothing already seen.
    store.delete_app_password(first[0].username, first[0].id, now=2000.0)
    rest = store.page_app_passwords(first[-1].id, 100)
    assert [r.id for r in rest if r.id in ids] == ids[3:]
    assert store.page_app_passwords(ids[-1], 10) == [r for r in rest if r.id > ids[-1]]


def test_a_users_state_is_set_only_if_it_is_still_what_was_read(store):
    before = store.get_user("alice")
    enforced = User("alice", MfaState.ENFORCED, 10.0)
    store.set_user(enforced, 10.0, expected=before)
    with pytest.raises(Conflict):
        store.set_user(User("alice", MfaState.DISABLED), 11.0, expected=before)
    assert store.get_user("alice") == enforced
    store.set_user(User("alice", MfaState.DISABLED), 12.0, expected=enforced)
    assert store.get_user("alice").mfa_state is MfaState.DISABLED


# -- passkeys ----------------------------------------------------------------------

def passkey(user="alice", name="laptop", cid=None, count=0, now=1000.0):
    from proxy.store import Passkey
    return Passkey(cid or os.urandom(32), user, name, b"credential-data", count, now)


def test_passkeys_are_added_listed_and_removed(store):
    from proxy.store import PasskeyTaken
    first = store.add_passkey(passkey(name="laptop", now=1000.0))
    second = store.add_passkey(passkey(name="phone", now=1001.0))
    store.add_passkey(passkey(user="bob", name="laptop"))
    assert [p.name for p in store.list_passkeys("alice")] == ["laptop", "phone"]
    assert store.list_passkeys("alice")[0] == first
    with pytest.raises(PasskeyTaken):
        store.add_passkey(passkey(name="laptop"))  # a name once per user
    with pytest.raises(PasskeyTaken):
        store.add_passkey(passkey(user="bob", name="other", cid=first.credential_id))
    assert store.delete_passkey("bob", first.credential_id) is None  # not bob's
    assert store.delete_passkey("alice", first.credential_id) == first
    assert store.list_passkeys("alice") == [second]
    seq = store.last_change()
    assert store.delete_passkeys("alice", 2000.0) == 1
    assert store.list_passkeys("alice") == []
    assert [c.kind.value for c in store.changes_since(seq)] == ["second_factor_reset"]
    assert [p.name for p in store.list_passkeys("bob")] == ["laptop"]


def test_a_passkey_whose_counter_goes_back_is_refused(store):
    key = store.add_passkey(passkey(count=5))
    assert store.use_passkey("alice", key.credential_id, 6, 1500.0)
    [used] = store.list_passkeys("alice")
    assert (used.sign_count, used.last_used_at) == (6, 1500.0)
    # A clone: the same counter again, or one lower. Nothing changes.
    assert not store.use_passkey("alice", key.credential_id, 6, 1600.0)
    assert not store.use_passkey("alice", key.credential_id, 2, 1600.0)
    assert not store.use_passkey("bob", key.credential_id, 9, 1600.0)
    assert store.list_passkeys("alice") == [used]
    # An authenticator that keeps no counter (always 0) is not a clone.
    zero = store.add_passkey(passkey(name="phone", count=0))
    assert store.use_passkey("alice", zero.credential_id, 0, 1700.0)
    assert store.use_passkey("alice", zero.credential_id, 0, 1800.0)
