"""The authentication core against a real slapd and a real SQLite store.

Every cell of the decision table (realm x user state x kind of secret), a
directory outage, accounts disabled or deleted while cached, revocation on
a primary-password change, caches, scope and expiry, the hashing pool's
bound, and answers that do not tell accounts apart.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from proxy import apppasswords
from proxy.admin import Admin
from proxy.audit import AuditLog
from proxy.auth import Attempt, Outcome, Reason
from proxy.auth.authenticator import Authenticator
from proxy.config import CacheConfig, DirectoryConfig, PolicyConfig, ThrottleConfig
from proxy.directory import Directory
from proxy.store import MfaState
from proxy.store.sqlite import SQLiteStore
from proxy.threads import Pool, Threaded

FAST = apppasswords.HashParameters(time_cost=1, memory_kib=1024, parallelism=1)
PRIMARY = "Primary-Passw0rd"


class CountingHasher(apppasswords.Hasher):
    """A real argon2id hasher that counts its verifies."""

    def __init__(self, parameters, delay=0.0):
        super().__init__(parameters)
        self.verifies = 0
        self.delay = delay
        self._lock = threading.Lock()

    def verify(self, encoded, secret):
        with self._lock:
            self.verifies += 1
        if self.delay:
            time.sleep(self.delay)
        return super().verify(encoded, secret)


class DirectorySpy(Directory):
    """The real directory client, counting what it is asked."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.resolves = 0
        self.binds = 0

    async def resolve(self, username):
        self.resolves += 1
        return await super().resolve(username)

    async def check_password(self, dn, password):
        self.binds += 1
        return await super().check_password(dn, password)


@attrs.define
class Env:
    """A store, the real directory client and an Authenticator built from them."""

    slapd: object
    tmp_path: object
    teardown: list = attrs.Factory(list)
    events: list = attrs.Factory(list)
    pepper: bytes = b""
    admin: Admin | None = None
    cli_store: object = None

    def __attrs_post_init__(self):
        self.pepper = apppasswords.load_pepper(self.tmp_path / "pepper", create=True)
        self.cli_store = SQLiteStore(self.tmp_path / "store.sqlite3")
        self.admin = Admin(
            store=self.cli_store, hasher=apppasswords.Hasher(FAST), pepper=self.pepper,
            audit=AuditLog(None, time.time), policy=PolicyConfig(), clock=time.time,
            actor="cli:test",
        )

    def directory_config(self, **overrides):
        password_file = self.tmp_path / "service-password"
        password_file.write_text(self.slapd.service_password + "\n")
        values = dict(
            url=self.slapd.url, bind_dn=self.slapd.service_dn,
            bind_password_file=password_file, user_base=self.slapd.people_dn,
            ca_file=self.slapd.ca_file, mfa_group=self.slapd.group_dn("mfa"),
            modern_auth_only_group=self.slapd.group_dn("modern-auth-only"),
            admin_group=self.slapd.group_dn("admins"), account_cache=0.0, timeout=3.0,
            pool_size=2,
        )
        values.update(overrides)
        return DirectoryConfig(**values)

    async def close(self) -> None:
        """Undo what make() started, last first."""
        for step in reversed(self.teardown):
            result = step()
            if result is not None:
                await result
        self.cli_store.close()

    async def make(self, *, policy=None, throttle=None, cache=None, hasher=None,
                   hash_threads=2, hash_queue=16, **directory):
        config = self.directory_config(**directory)
        store_pool = Pool(reactor, "store", 1, 1000)
        hash_pool = Pool(reactor, "argon2", hash_threads, hash_queue)
        for pool in (store_pool, hash_pool):
            pool.start()
            self.teardown.append(pool.stop)
        store = SQLiteStore(self.tmp_path / "store.sqlite3")
        directory = DirectorySpy(reactor, config, self.slapd.service_password,
                                 self.slapd.ca_file.read_bytes())
        directory.start()
        auth = Authenticator(
            clock=reactor,
            policy=policy or PolicyConfig(),
            throttle=throttle or ThrottleConfig(source_delay=0, source_delay_max=0),
            cache=cache or CacheConfig(),
            directory_config=config,
            directory=directory,
            store=Threaded(store, store_pool),
            hash_pool=hash_pool,
            hasher=hasher or CountingHasher(FAST),
            pepper=self.pepper,
            record=lambda event, **fields: self.events.append({"event": event, **fields}),
        )
        await auth.start(poll_interval=0.05)
        auth.directory = directory

        async def stop():
            await auth.stop()
            await directory.stop()
            # On the store's own thread, after whatever is queued there (a
            # last use being recorded), as the daemon closes it: sqlite3
            # closed under a call in flight on another thread crashes.
            await store_pool.submit(store.close)

        self.teardown.append(stop)
        return auth


@pytest_twisted.async_yield_fixture
async def env(slapd, tmp_path):
    e = Env(slapd, tmp_path)
    yield e
    await e.close()


def attempt(username, secret, realm="cloud", protocol="imap", address="192.0.2.10"):
    return Attempt(protocol=protocol, realm=realm, username=username, secret=secret,
                   client_address=address, tls=True)


async def sleep(seconds):
    await deferLater(reactor, seconds, lambda: None)


# -- the decision table ----------------------------------------------------------

STATES = ["disabled", "enabled", "enforced", "mfa-group", "modern-auth-only", "inactive",
          "unknown"]
EXPECTED = {
    # state: (cloud: app, primary, wrong), (on-premises: app, primary, wrong)
    "disabled": (("app_password", "primary", "wrong_secret"),
                 ("wrong_secret", "primary", "wrong_secret")),
    "enabled": (("app_password", "primary", "wrong_secret"),
                ("wrong_secret", "primary", "wrong_secret")),
    "enforced": (("app_password", "mfa_required", "mfa_required"),
                 ("wrong_secret", "primary", "wrong_secret")),
    "mfa-group": (("app_password", "mfa_required", "mfa_required"),
                  ("wrong_secret", "primary", "wrong_secret")),
    "modern-auth-only": (("legacy_blocked",) * 3, ("legacy_blocked",) * 3),
    "inactive": (("account_inactive",) * 3, ("account_inactive",) * 3),
    "unknown": (("unknown_user",) * 3, ("unknown_user",) * 3),
}


@pytest.mark.parametrize("state", STATES)
@pytest_twisted.ensureDeferred
async def test_decision_table(env, slapd, unique, state):
    auth = await env.make()
    uid = unique()
    groups = {"mfa-group": ["mfa"], "modern-auth-only": ["modern-auth-only"]}.get(state, [])
    if state != "unknown":
        slapd.add_user(uid, PRIMARY, groups=groups, locked=state == "inactive")
    if state in ("enabled", "enforced"):
        env.admin.set_mfa(uid, MfaState(state))
    secret = env.admin.create(uid, "phone").secret
    secrets = {"app": secret, "primary": PRIMARY, "wrong": "not-the-password"}
    for realm, expected in zip(("cloud", "on-premises"), EXPECTED[state]):
        for kind, reason in zip(("app", "primary", "wrong"), expected):
            decision = await auth.authenticate(attempt(uid, secrets[kind], realm=realm))
            assert decision.reason.value == reason, (realm, kind)
            assert decision.accepted == (reason in ("app_password", "primary"))
    if state in ("disabled", "enforced"):
        accepted = await auth.authenticate(attempt(uid, secret))
        assert accepted.read_only and not accepted.administrator
        assert accepted.app_password.name == "phone"


@pytest_twisted.ensureDeferred
async def test_blocking_legacy_auth_stops_everything(env, slapd, unique):
    auth = await env.make(policy=PolicyConfig(block_legacy_auth=True))
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    secret = env.admin.create(uid, "phone").secret
    for realm in ("cloud", "on-premises"):
        for s in (secret, PRIMARY):
            assert (await auth.authenticate(attempt(uid, s, realm))).reason is Reason.LEGACY_BLOCKED
    assert auth.directory.resolves == 0 and auth.directory.binds == 0


@pytest_twisted.ensureDeferred
async def test_administrators_keep_their_rights_only_with_the_primary_password(env, slapd, unique):
    auth = await env.make()
    uid = unique()
    slapd.add_user(uid, PRIMARY, groups=["admins"])
    secret = env.admin.create(uid, "laptop").secret
    by_app = await auth.authenticate(attempt(uid, secret))
    by_primary = await auth.authenticate(attempt(uid, PRIMARY))
    assert by_app.accepted and by_app.read_only and not by_app.administrator
    assert by_primary.accepted and by_primary.administrator and not by_primary.read_only


@pytest_twisted.ensureDeferred
async def test_one_account_by_uid_mail_dn_and_any_case(env, slapd, unique):
    auth = await env.make()
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY, mail=f"{uid}.mail@example.test")
    secret = env.admin.create(uid, "phone").secret
    for name in (uid, uid.upper(), f"{uid}.mail@example.test", dn, dn.upper()):
        decision = await auth.authenticate(attempt(name, apppasswords.display(secret).upper()))
        assert decision.reason is Reason.APP_PASSWORD, name
        assert decision.username == uid


@pytest.mark.parametrize("name", ["*", f"{'u'}*", "x)(uid=*", "x\\", "(uid=*)"])
@pytest_twisted.ensureDeferred
async def test_filter_characters_in_names_match_nothing(env, slapd, name):
    auth = await env.make()
    decision = await auth.authenticate(attempt(name, PRIMARY))
    assert decision.reason is Reason.UNKNOWN_USER
    assert auth.directory.binds == 0


@pytest.mark.parametrize("name, secret", [
    ("alice", ""), ("alice", "   \t"), ("al\nice", PRIMARY), ("al\rice", PRIMARY),
    ("al\x00ice", PRIMARY), ("", PRIMARY),
])
@pytest_twisted.ensureDeferred
async def test_malformed_attempts_never_reach_the_directory(env, name, secret):
    auth = await env.make()
    decision = await auth.authenticate(attempt(name, secret))
    assert decision.reason is Reason.MALFORMED
    assert decision.outcome is Outcome.REFUSED
    assert auth.directory.resolves == 0 and auth.directory.binds == 0


# -- app passwords: cost, cache, scope, expiry, rehash -----------------------------


@pytest_twisted.ensureDeferred
async def test_no_argon2_run_for_a_secret_that_matches_no_app_password(env, slapd, unique):
    hasher = CountingHasher(FAST)
    auth = await env.make(hasher=hasher)
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    env.admin.set_mfa(uid, MfaState.ENFORCED)
    for i in range(40):
        env.admin.create(uid, f"device {i}")
    for guess in ("abcd efgh ijkl mnop", "zzzzzzzzzzzzzzzz", PRIMARY, "wrong"):
        decision = await auth.authenticate(attempt(uid, guess))
        assert not decision.accepted
    assert hasher.verifies == 0


@pytest_twisted.ensureDeferred
async def test_a_cached_app_password_costs_no_argon2_until_it_is_deleted(env, slapd, unique):
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    env.admin.set_mfa(uid, MfaState.ENFORCED)
    created = env.admin.create(uid, "phone")
    hasher = CountingHasher(FAST)
    auth = await env.make(hasher=hasher)
    revoked = []
    auth.on_revoked(lambda user, id, kind: revoked.append((user, id, kind)))
    for _ in range(5):
        assert (await auth.authenticate(attempt(uid, created.secret))).accepted
    assert hasher.verifies == 1
    # Deleted by the command line tool, in another connection to the store:
    # the daemon follows the change feed.
    env.admin.delete(uid, "phone")
    await sleep(0.3)
    assert revoked == [(uid, created.record.id, "deleted")]
    decision = await auth.authenticate(attempt(uid, created.secret))
    assert decision.reason is Reason.MFA_REQUIRED
    assert hasher.verifies == 1


@pytest_twisted.ensureDeferred
async def test_revoke_all_and_state_changes_drop_the_cache(env, slapd, unique):
    hasher = CountingHasher(FAST)
    auth = await env.make(hasher=hasher)
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    one = env.admin.create(uid, "one").secret
    assert (await auth.authenticate(attempt(uid, one))).accepted
    env.admin.set_mfa(uid, MfaState.ENFORCED)
    await sleep(0.3)
    assert (await auth.authenticate(attempt(uid, one))).accepted
    assert hasher.verifies == 2  # the state change dropped the cached entry
    env.admin.revoke_all(uid)
    await sleep(0.3)
    assert (await auth.authenticate(attempt(uid, one))).reason is Reason.MFA_REQUIRED


@pytest_twisted.ensureDeferred
async def test_scope_and_expiry(env, slapd, unique):
    auth = await env.make()
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    env.admin.set_mfa(uid, MfaState.ENFORCED)
    mail_only = env.admin.create(uid, "mail", protocols=frozenset({"imap", "smtp"})).secret
    soon = env.admin.create(uid, "soon", expires_at=time.time() + 1.0).secret
    assert (await auth.authenticate(attempt(uid, mail_only, protocol="smtp"))).accepted
    decision = await auth.authenticate(attempt(uid, mail_only, protocol="ldap"))
    assert decision.reason is Reason.OUT_OF_SCOPE and not decision.accepted
    assert (await auth.authenticate(attempt(uid, soon))).accepted
    await sleep(1.1)
    assert (await auth.authenticate(attempt(uid, soon))).reason is Reason.EXPIRED


@pytest_twisted.ensureDeferred
async def test_outdated_parameters_are_rehashed_after_a_successful_check(env, slapd, unique):
    newer = apppasswords.HashParameters(time_cost=2, memory_kib=2048, parallelism=1)
    auth = await env.make(hasher=CountingHasher(newer))
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    created = env.admin.create(uid, "phone")
    key = apppasswords.lookup_key(env.pepper, uid, created.secret)
    assert "m=1024,t=1" in env.cli_store.find_by_lookup_key(key)[1]
    assert (await auth.authenticate(attempt(uid, created.secret))).accepted
    await sleep(0.3)
    encoded = env.cli_store.find_by_lookup_key(key)[1]
    assert "m=2048,t=2" in encoded
    assert apppasswords.Hasher(newer).verify(encoded, created.secret)


@pytest_twisted.ensureDeferred
async def test_last_use_is_recorded_and_coalesced(env, slapd, unique):
    auth = await env.make()
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    created = env.admin.create(uid, "phone")
    for _ in range(5):
        assert (await auth.authenticate(attempt(uid, created.secret, address="203.0.113.9"))).accepted
    assert auth.usage.writes == 1
    await auth.usage.flush()
    (record,) = env.cli_store.list_app_passwords(uid)
    assert record.use_count == 5
    assert record.last_used_address == "203.0.113.9" and record.last_used_protocol == "imap"


@pytest_twisted.ensureDeferred
async def test_a_full_hashing_queue_answers_busy_at_once(env, slapd, unique):
    auth = await env.make(hasher=CountingHasher(FAST, delay=0.5), hash_threads=1, hash_queue=0)
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    secrets = [env.admin.create(uid, f"d{i}").secret for i in range(3)]
    decisions = await gatherResults(
        [Deferred.fromCoroutine(auth.authenticate(attempt(uid, s))) for s in secrets]
    )
    reasons = sorted(d.reason.value for d in decisions)
    assert reasons.count("app_password") >= 1
    assert "busy" in reasons
    assert all(d.outcome is Outcome.TEMPORARY_FAILURE for d in decisions if d.reason is Reason.BUSY)


# -- the directory's word ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_account_disabled_or_deleted_is_refused_at_once_with_no_cache(env, slapd, unique):
    auth = await env.make(account_cache=0.0)
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY)
    secret = env.admin.create(uid, "phone").secret
    assert (await auth.authenticate(attempt(uid, secret))).accepted  # now cached
    slapd.lock(dn)
    assert (await auth.authenticate(attempt(uid, secret))).reason is Reason.ACCOUNT_INACTIVE
    assert (await auth.authenticate(attempt(uid, PRIMARY))).reason is Reason.ACCOUNT_INACTIVE
    slapd.unlock(dn)
    assert (await auth.authenticate(attempt(uid, secret))).accepted
    slapd.delete(dn)
    assert (await auth.authenticate(attempt(uid, secret))).reason is Reason.UNKNOWN_USER


@pytest_twisted.ensureDeferred
async def test_an_account_disabled_while_cached_is_refused_within_the_window(env, slapd, unique):
    auth = await env.make(account_cache=1.0)
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY)
    secret = env.admin.create(uid, "phone").secret
    assert (await auth.authenticate(attempt(uid, secret))).accepted
    slapd.lock(dn)
    started = time.monotonic()
    while (await auth.authenticate(attempt(uid, secret))).accepted:
        assert time.monotonic() - started < 1.5, "still accepted after the account cache's lifetime"
        await sleep(0.1)
    assert time.monotonic() - started <= 1.5


@pytest_twisted.ensureDeferred
async def test_app_passwords_older_than_a_password_change_are_revoked(env, slapd, unique):
    auth = await env.make()
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY)
    old = env.admin.create(uid, "old").secret
    assert (await auth.authenticate(attempt(uid, old))).accepted
    await sleep(1.1)  # pwdChangedTime counts whole seconds
    slapd.set_password(dn, "New-Passw0rd")
    await sleep(1.1)
    new = env.admin.create(uid, "new").secret
    decision = await auth.authenticate(attempt(uid, old))
    assert decision.reason is Reason.REVOKED_BY_PASSWORD_CHANGE
    # Stopped, and listed as stopped with the reason.
    assert [(a.name, a.stopped_reason) for a in env.cli_store.list_app_passwords(uid)] == [
        ("old", "password_change"), ("new", None)]
    assert (await auth.authenticate(attempt(uid, new))).accepted
    assert (await auth.authenticate(attempt(uid, "New-Passw0rd"))).reason is Reason.PRIMARY
    assert any(e["event"] == "app_passwords_stopped" and e["actor"] == "password_change"
               for e in env.events)


@pytest_twisted.ensureDeferred
async def test_revocation_on_password_change_can_be_turned_off(env, slapd, unique):
    auth = await env.make(policy=PolicyConfig(revoke_app_passwords_on_password_change=False))
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY)
    old = env.admin.create(uid, "old").secret
    await sleep(1.1)
    slapd.set_password(dn, "New-Passw0rd")
    decision = await auth.authenticate(attempt(uid, old))
    assert decision.reason is Reason.REVOKED_BY_PASSWORD_CHANGE
    assert [a.name for a in env.cli_store.list_app_passwords(uid)] == ["old"]


@pytest_twisted.ensureDeferred
async def test_a_directory_outage(env, slapd, unique):
    auth = await env.make(account_cache=0.0, outage_grace=3600)
    seen, unseen = unique(), unique()
    slapd.add_user(seen, PRIMARY)
    slapd.add_user(unseen, PRIMARY)
    seen_secret = env.admin.create(seen, "phone").secret
    unseen_secret = env.admin.create(unseen, "phone").secret
    assert (await auth.authenticate(attempt(seen, seen_secret))).accepted
    slapd.stop()
    try:
        # The cloud keeps serving app passwords of accounts seen active...
        decision = await auth.authenticate(attempt(seen, seen_secret))
        assert decision.reason is Reason.APP_PASSWORD
        # ...but nothing that needs the directory's word.
        for name, secret, realm in ((seen, PRIMARY, "cloud"), (unseen, unseen_secret, "cloud"),
                                    (seen, seen_secret, "on-premises"),
                                    (seen, PRIMARY, "on-premises")):
            decision = await auth.authenticate(attempt(name, secret, realm))
            assert decision.reason is Reason.DIRECTORY_UNAVAILABLE, (name, realm)
            assert decision.outcome is Outcome.TEMPORARY_FAILURE
    finally:
        slapd.start()
    started = time.monotonic()
    while not (await auth.authenticate(attempt(unseen, PRIMARY))).accepted:
        assert time.monotonic() - started < 35, "the directory client did not reconnect"
        await sleep(0.2)


@pytest_twisted.ensureDeferred
async def test_an_authorization_identity_other_than_the_user_is_refused_and_audited(
        env, slapd, unique):
    """SASL PLAIN's authorization identity: acting as someone else is what
    master users do, never clients. The core decides, before any lookup."""
    auth = await env.make()
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    secret = env.admin.create(uid, "phone").secret
    foreign = attrs.evolve(attempt(uid, secret), authzid="admin")
    decision = await auth.authenticate(foreign)
    assert decision.reason is Reason.FOREIGN_AUTHZID and not decision.accepted
    same = attrs.evolve(attempt(uid, secret), authzid=uid.upper())
    assert (await auth.authenticate(same)).accepted
    assert any(e.get("reason") == "foreign_authzid" and e.get("user") == uid for e in env.events)


@pytest.mark.parametrize("account_cache", [0.0, 3600.0])
@pytest_twisted.ensureDeferred
async def test_an_account_found_locked_under_one_name_is_locked_under_all(
        env, slapd, unique, account_cache):
    """What is known of an account is kept by the account: gina signs in as
    gina@example.test, is then locked and refused as gina; from then on
    neither name gets in, from the account cache (without waiting for it to
    expire) or during an outage that follows."""
    auth = await env.make(account_cache=account_cache, outage_grace=3600)
    uid = unique("gina")
    dn = slapd.add_user(uid, PRIMARY)
    secret = env.admin.create(uid, "phone").secret
    mail = f"{uid}@example.test"
    assert (await auth.authenticate(attempt(mail, secret))).accepted
    slapd.lock(dn)
    try:
        for name in (uid, mail):
            decision = await auth.authenticate(attempt(name, secret))
            assert decision.reason is Reason.ACCOUNT_INACTIVE, name
        slapd.stop()
        try:
            for name in (mail, uid):
                decision = await auth.authenticate(attempt(name, secret))
                assert not decision.accepted, name
        finally:
            slapd.start()
    finally:
        slapd.unlock(dn)


@pytest_twisted.ensureDeferred
async def test_no_grace_means_no_service_during_an_outage(env, slapd, unique):
    auth = await env.make(account_cache=0.0, outage_grace=0)
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    secret = env.admin.create(uid, "phone").secret
    assert (await auth.authenticate(attempt(uid, secret))).accepted
    slapd.stop()
    try:
        decision = await auth.authenticate(attempt(uid, secret))
        assert decision.reason is Reason.DIRECTORY_UNAVAILABLE
    finally:
        slapd.start()


@pytest_twisted.ensureDeferred
async def test_ldaps_and_plain_connections(env, slapd, unique):
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    for overrides in ({"url": slapd.ldaps_url}, {"start_tls": False}):
        auth = await env.make(**overrides)
        assert (await auth.authenticate(attempt(uid, PRIMARY))).accepted, overrides


# -- throttling and enumeration ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrent_guesses_reach_the_directory_no_more_than_the_lockout_allows(
        env, slapd, unique):
    """Forty wrong passwords for one account at once: slapd sees ten binds
    (the lockout's count), as it would one after another."""
    auth = await env.make(throttle=ThrottleConfig(source_delay=0, source_delay_max=0,
                                                  account_failures=10))
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY)
    since = len(slapd.log_text())
    decisions = await gatherResults([
        Deferred.fromCoroutine(auth.authenticate(attempt(uid, f"guess-{i}")))
        for i in range(40)
    ])
    reasons = [d.reason for d in decisions]
    assert reasons.count(Reason.WRONG_SECRET) == 10
    assert reasons.count(Reason.LOCKED_OUT) == 30
    await deferLater(reactor, 0.5)  # slapd logs a moment after it answers
    binds = re.findall(rf'BIND dn="{re.escape(dn)}"', slapd.log_text()[since:], re.IGNORECASE)
    assert len(binds) == 10


@pytest_twisted.ensureDeferred
async def test_a_locked_account_is_refused_before_any_bind(env, slapd, unique):
    auth = await env.make(throttle=ThrottleConfig(source_delay=0, source_delay_max=0,
                                                  account_failures=3))
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    home, stranger = "192.0.2.10", "198.51.100.66"
    assert (await auth.authenticate(attempt(uid, PRIMARY, address=home))).accepted
    for guess in ("a1", "a2", "a3"):
        decision = await auth.authenticate(attempt(uid, guess, address=stranger))
        assert decision.reason is Reason.WRONG_SECRET
    binds = auth.directory.binds
    decision = await auth.authenticate(attempt(uid, PRIMARY, address=stranger))
    assert decision.reason is Reason.LOCKED_OUT
    assert auth.directory.binds == binds
    # The owner's familiar place is not locked by a stranger's guesses.
    assert (await auth.authenticate(attempt(uid, PRIMARY, address=home))).accepted


@pytest_twisted.ensureDeferred
async def test_failure_answers_are_delayed_per_source(env, slapd, unique):
    auth = await env.make(throttle=ThrottleConfig(source_delay=0.1, source_delay_max=0.2))
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    times = []
    for _ in range(3):
        started = time.monotonic()
        await auth.authenticate(attempt(uid, "wrong", address="198.51.100.1"))
        times.append(time.monotonic() - started)
    assert times[0] >= 0.1 and times[1] >= 0.2 and times[2] >= 0.2
    started = time.monotonic()
    assert (await auth.authenticate(attempt(uid, PRIMARY, address="198.51.100.1"))).accepted


@pytest_twisted.ensureDeferred
async def test_answers_do_not_tell_whether_an_account_exists(env, slapd, unique):
    """The median answer time for unknown accounts and for known accounts
    with a wrong secret are alike: both are held to the failure delay."""
    auth = await env.make(throttle=ThrottleConfig(
        source_delay=0.05, source_delay_max=0.05, account_failures=1000))
    known = unique()
    slapd.add_user(known, PRIMARY)
    unknown_times, known_times = [], []
    for i in range(15):
        for name, times in ((f"nobody{i}", unknown_times), (known, known_times)):
            started = time.monotonic()
            decision = await auth.authenticate(attempt(name, f"wrong-{i}"))
            times.append(time.monotonic() - started)
            assert decision.outcome is Outcome.REFUSED
    difference = abs(statistics.median(known_times) - statistics.median(unknown_times))
    assert min(known_times + unknown_times) >= 0.05
    assert difference < 0.02, (statistics.median(known_times), statistics.median(unknown_times))


# -- audit --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_decision_is_audited_without_the_secret(env, slapd, unique):
    auth = await env.make()
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    created = env.admin.create(uid, "phone")
    await auth.authenticate(attempt(uid, created.secret, protocol="smtp", address="203.0.113.4"))
    await auth.authenticate(attempt(uid, "wrong-one"))
    await auth.authenticate(attempt(uid, PRIMARY, realm="on-premises", protocol="ldap"))
    events = [e for e in env.events if e["event"] == "authentication"]
    assert [(e["outcome"], e["reason"]) for e in events] == [
        ("accepted", "app_password"), ("refused", "wrong_secret"), ("accepted", "primary")]
    assert events[0]["app_password_id"] == created.record.id
    assert events[0]["app_password_name"] == "phone"
    assert (events[0]["protocol"], events[0]["realm"], events[0]["client_address"]) == (
        "smtp", "cloud", "203.0.113.4")
    text = json.dumps(env.events)
    for secret in (created.secret, apppasswords.display(created.secret), "wrong-one", PRIMARY):
        assert secret not in text


@pytest_twisted.ensureDeferred
async def test_primary_checks_rebind_pooled_connections(env, slapd, unique):
    """Ten password checks bind on at most pool_size connections: re-bound,
    not reopened."""
    auth = await env.make(pool_size=2)
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY)
    for i in range(10):
        secret = PRIMARY if i % 2 else f"wrong-{i}"
        await auth.authenticate(attempt(uid, secret, realm="on-premises",
                                        address=f"192.0.2.{i + 1}"))
    pattern = rf'conn=(\d+) op=\d+ BIND dn="{re.escape(dn)}" method=128'
    binds = re.findall(pattern, slapd.log_text(), re.I)
    assert len(binds) == 10
    assert len(set(binds)) <= 2


@pytest_twisted.ensureDeferred
async def test_a_stale_password_retried_reaches_the_directory_once(env, slapd, unique):
    """A phone retrying an old password must not lock its owner out in the
    directory: the same wrong secret is answered without another bind."""
    auth = await env.make()
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    for _ in range(5):
        decision = await auth.authenticate(attempt(uid, "Old-Passw0rd", realm="on-premises"))
        assert decision.reason is Reason.WRONG_SECRET
    assert auth.directory.binds == 1
    assert (await auth.authenticate(attempt(uid, PRIMARY, realm="on-premises"))).accepted


@pytest_twisted.ensureDeferred
async def test_an_app_password_deleted_during_its_check_is_not_let_through(env, slapd, unique):
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    env.admin.set_mfa(uid, MfaState.ENFORCED)
    created = env.admin.create(uid, "phone")
    auth = await env.make(hasher=CountingHasher(FAST, delay=0.5))
    checking = Deferred.fromCoroutine(auth.authenticate(attempt(uid, created.secret)))
    await sleep(0.2)  # the argon2 check is under way
    env.admin.delete(uid, "phone")
    first = await checking
    second = await auth.authenticate(attempt(uid, created.secret))
    assert not first.accepted and not second.accepted


@pytest_twisted.ensureDeferred
async def test_a_sign_in_by_dn_must_match_the_user_filter(env, slapd, unique):
    auth = await env.make(
        user_filter="(&(objectClass=inetOrgPerson)(!(uid=blocked*))(|(uid={username})(mail={username})))")
    uid = unique("blocked")
    dn = slapd.add_user(uid, PRIMARY)
    for name in (dn, uid):
        assert (await auth.authenticate(attempt(name, PRIMARY))).reason is Reason.UNKNOWN_USER
