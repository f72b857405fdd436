"""The decision core on a task.Clock, with a fake directory and the real
store: every branch of the decision in microseconds. The same decisions
against a real slapd are in tests/integration/test_authenticator.py."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet.defer import Deferred, ensureDeferred

from proxy.auth import Attempt, Outcome, Reason
from proxy.config import CacheConfig, PolicyConfig, ThrottleConfig
from proxy.store import MfaState
from tests.unit.fakes import Core

PRIMARY = "Primary-Passw0rd"


@pytest.fixture
def core(tmp_path):
    return Core(tmp_path)


def attempt(username, secret, realm="cloud", protocol="imap", address="192.0.2.10", **kw):
    return Attempt(protocol=protocol, realm=realm, username=username, secret=secret,
                   client_address=address, tls=True, **kw)


def decide(core, *args, **kw):
    """The decision, which on a clock with no delays is made at once."""
    d = ensureDeferred(core.auth.authenticate(attempt(*args, **kw)))
    core.clock.advance(60)  # past any failure delay
    assert d.called, "the decision waits for something"
    return d.result


def test_the_decision_table(core):
    core.build()
    core.directory.add("alice", PRIMARY)
    core.directory.add("eve", PRIMARY, mfa_enforced=True)
    core.directory.add("mo", PRIMARY, modern_auth_only=True)
    core.directory.add("gone", PRIMARY)
    core.directory.change("gone", active=False)
    app = core.admin.create("alice", "phone").secret
    eve_app = core.admin.create("eve", "phone").secret
    cases = [
        (("alice", app), Reason.APP_PASSWORD),
        (("alice", PRIMARY), Reason.PRIMARY),
        (("alice", "wrong"), Reason.WRONG_SECRET),
        (("nobody", app), Reason.UNKNOWN_USER),
        (("eve", eve_app), Reason.APP_PASSWORD),
        (("eve", PRIMARY), Reason.MFA_REQUIRED),
        (("mo", PRIMARY), Reason.LEGACY_BLOCKED),
        (("gone", PRIMARY), Reason.ACCOUNT_INACTIVE),
        (("alice", app, "on-premises"), Reason.WRONG_SECRET),  # app passwords are unknown there
        (("alice", PRIMARY, "on-premises"), Reason.PRIMARY),
        (("", "x"), Reason.MALFORMED),
        (("alice", " "), Reason.MALFORMED),
    ]
    for args, reason in cases:
        assert decide(core, *args).reason is reason, args
    assert core.auth.apps.argon2_runs == 2  # wrong secrets never cost one


def test_app_passwords_are_read_only_and_primary_sessions_are_not(core):
    core.build()
    core.directory.add("alice", PRIMARY)
    app = core.admin.create("alice", "phone").secret
    assert decide(core, "alice", app).read_only
    assert not decide(core, "alice", PRIMARY).read_only


def test_plaintext_foreign_authzid_and_anonymous_are_decided_and_audited(core):
    core.build()
    core.directory.add("alice", PRIMARY)
    plain = attrs.evolve(attempt("alice", PRIMARY), tls=False)
    d = ensureDeferred(core.auth.authenticate(plain))
    assert d.result.reason is Reason.PLAINTEXT  # at once: not a guess, not delayed
    allowed = attrs.evolve(plain, plaintext_allowed=True)
    assert decide_attempt(core, allowed).accepted
    assert decide(core, "alice", PRIMARY, authzid="admin").reason is Reason.FOREIGN_AUTHZID
    assert decide(core, "alice", PRIMARY, authzid="ALICE").accepted
    assert core.auth.anonymous(attempt("", "")).reason is Reason.ANONYMOUS_REFUSED
    assert core.auth.anonymous(attempt("", "", anonymous_allowed=True)).accepted
    reasons = [e["reason"] for e in core.events if e["event"] == "authentication"]
    assert reasons == ["plaintext", "primary", "foreign_authzid", "primary",
                       "anonymous_refused", "anonymous"]


def decide_attempt(core, a):
    d = ensureDeferred(core.auth.authenticate(a))
    core.clock.advance(60)
    return d.result


def test_expiry_scope_and_a_password_change(core):
    core.build()
    core.directory.add("alice", PRIMARY)
    core.clock.advance(1000)
    soon = core.admin.create("alice", "soon", expires_at=core.clock.seconds() + 60).secret
    smtp_only = core.admin.create("alice", "printer", protocols=frozenset({"smtp"})).secret
    assert decide(core, "alice", soon).accepted
    assert decide(core, "alice", smtp_only).reason is Reason.OUT_OF_SCOPE
    assert decide(core, "alice", smtp_only, protocol="smtp").accepted
    core.clock.advance(120)
    assert decide(core, "alice", soon).reason is Reason.EXPIRED
    core.directory.change("alice", password_changed_at=core.clock.seconds())
    assert decide(core, "alice", smtp_only, protocol="smtp").reason is (
        Reason.REVOKED_BY_PASSWORD_CHANGE)
    # Stopped by the change (the policy's default), and listed with why; the
    # one that had expired already stays expired.
    now = core.clock.seconds()
    assert {a.name: a.stopped(now) for a in core.store.list_app_passwords("alice")} == {
        "soon": "expired", "printer": "password_change"}


def test_source_networks_and_idle_expiry(core):
    core.build(policy=PolicyConfig(app_password_idle_expiry=86400.0))
    core.directory.add("alice", PRIMARY)
    office = core.admin.create("alice", "scanner", networks=("192.0.2.0/24",)).secret
    assert decide(core, "alice", office, address="192.0.2.99").accepted
    assert decide(core, "alice", office, address="198.51.100.1").reason is Reason.OUT_OF_SCOPE
    # Cached, and still out of scope from elsewhere.
    assert decide(core, "alice", office, address="198.51.100.1").reason is Reason.OUT_OF_SCOPE
    phone = core.admin.create("alice", "phone").secret
    core.clock.advance(86400 + 1)
    assert decide(core, "alice", phone).reason is Reason.UNUSED
    stopped = core.store.sweep(core.clock.seconds(), 86400.0)
    assert {a.name for a in stopped} >= {"phone"}
    assert decide(core, "alice", phone).reason is Reason.UNUSED


def test_the_success_cache_spares_argon2_until_a_revocation(core):
    core.build()
    core.directory.add("alice", PRIMARY)
    created = core.admin.create("alice", "phone")
    for _ in range(5):
        assert decide(core, "alice", created.secret).accepted
    assert core.auth.apps.argon2_runs == 1
    revoked = []
    core.auth.on_revoked(lambda *change: revoked.append(change))
    core.admin.delete("alice", "phone")
    ensureDeferred(core.auth.poll_changes())
    assert revoked == [("alice", created.record.id, "deleted")]
    assert decide(core, "alice", created.secret).reason is Reason.WRONG_SECRET


def test_deleting_one_app_password_leaves_sign_ins_with_the_others_standing(core):
    """A sign-in under way with the phone's app password (its backend login
    not yet done) goes on when the laptop's is deleted, as the phone's open
    sessions do; deleting the phone's, or revoking the whole user, stops it."""
    core.build()
    core.directory.add("alice", PRIMARY)
    phone = core.admin.create("alice", "phone").secret
    core.admin.create("alice", "laptop")
    decision = decide(core, "alice", phone)
    assert decision.accepted
    core.admin.delete("alice", "laptop")
    ensureDeferred(core.auth.poll_changes())
    assert not core.auth.revoked_since(decision)
    core.admin.delete("alice", "phone")
    ensureDeferred(core.auth.poll_changes())
    assert core.auth.revoked_since(decision)
    again = core.admin.create("alice", "phone 2").secret
    decision = decide(core, "alice", again)
    core.auth.apply(attrs.evolve(_change(), username="alice", kind="account_inactive"))
    assert core.auth.revoked_since(decision)


def test_a_revocation_during_a_check_is_not_let_through(core):
    core.build()
    core.directory.add("alice", PRIMARY)
    core.directory.gate = Deferred()
    d = ensureDeferred(core.auth.authenticate(attempt("alice", PRIMARY)))
    assert not d.called  # waiting for the directory
    core.auth.apply(attrs.evolve(_change(), username="alice", kind="account_inactive"))
    gate, core.directory.gate = core.directory.gate, None
    gate.callback(None)
    core.clock.advance(60)
    decision = d.result
    assert decision.accepted and core.auth.revoked_since(attrs.evolve(decision, revision=0))


def _change():
    from proxy.store import Change

    return Change(seq=1, username="alice", kind="state_changed", app_password_id=None, at=0.0)


def test_lockout_counts_checks_under_way(core):
    core.build(throttle=ThrottleConfig(source_delay=0, source_delay_max=0, account_failures=3,
                                       lockout=600))
    core.directory.add("alice", PRIMARY)
    core.directory.gate = Deferred()
    pending = [ensureDeferred(core.auth.authenticate(attempt("alice", f"guess{i}")))
               for i in range(6)]
    assert core.directory.checks == 3
    core.directory.gate.callback(None)
    core.directory.gate = None
    core.clock.advance(60)
    reasons = sorted(d.result.reason.value for d in pending)
    assert reasons == ["locked_out"] * 3 + ["wrong_secret"] * 3
    assert decide(core, "alice", PRIMARY).reason is Reason.LOCKED_OUT


def test_an_outage_keeps_app_passwords_of_accounts_seen_active(core):
    core.build(outage_grace=3600)
    core.directory.add("alice", PRIMARY)
    core.directory.add("bob", PRIMARY)
    alice = core.admin.create("alice", "phone").secret
    bob = core.admin.create("bob", "phone").secret
    assert decide(core, "alice", alice).accepted
    core.directory.down = True
    assert decide(core, "alice", alice).reason is Reason.APP_PASSWORD
    assert decide(core, "alice", PRIMARY).reason is Reason.DIRECTORY_UNAVAILABLE
    assert decide(core, "bob", bob).reason is Reason.DIRECTORY_UNAVAILABLE  # never seen
    core.clock.advance(3601)
    assert decide(core, "alice", alice).outcome is Outcome.TEMPORARY_FAILURE


def test_the_outage_grace_is_not_for_a_directory_that_answers(core):
    """Calls that fail because the proxy's connections are busy, while the
    directory answers: what it said before is not used (the account may have
    been disabled since)."""
    core.build(outage_grace=3600)
    core.directory.add("alice", PRIMARY)
    alice = core.admin.create("alice", "phone").secret
    assert decide(core, "alice", alice).accepted
    core.directory.down = core.directory.busy = True
    assert decide(core, "alice", alice).reason is Reason.DIRECTORY_UNAVAILABLE
    core.directory.busy = False  # out of reach: the grace applies
    assert decide(core, "alice", alice).reason is Reason.APP_PASSWORD


def test_blocking_legacy_authentication_and_revoking_everyone(core):
    core.build()
    core.directory.add("alice", PRIMARY)
    decision = decide(core, "alice", PRIMARY)
    core.auth.revoke_everyone()
    assert core.auth.revoked_since(decision)
    core.auth.policy = PolicyConfig(block_legacy_auth=True)
    assert decide(core, "alice", PRIMARY).reason is Reason.LEGACY_BLOCKED


def test_a_full_hashing_pool_is_a_temporary_failure(core):
    core.build(cache=CacheConfig(app_password_ttl=0))
    core.directory.add("alice", PRIMARY)
    app = core.admin.create("alice", "phone").secret
    core.hash_pool.busy = True
    assert decide(core, "alice", app).reason is Reason.BUSY


def test_enforced_in_the_store_is_enough(core):
    core.build()
    core.directory.add("alice", PRIMARY)
    core.admin.set_mfa("alice", MfaState.ENFORCED)
    assert decide(core, "alice", PRIMARY).reason is Reason.MFA_REQUIRED


def test_with_whose_rights_an_ldap_session_reads_is_the_cores_decision(core):
    core.build()
    core.directory.add("alice", PRIMARY)
    app = core.admin.create("alice", "appliance").secret
    dn = core.directory.accounts["alice"].dn
    primary = decide(core, "alice", PRIMARY, protocol="ldap")
    assert (primary.reads_as, primary.acting_for) == (dn, None)
    by_app = decide(core, "alice", app, protocol="ldap")
    assert (by_app.reads_as, by_app.acting_for) == ("cn=proxy,dc=example,dc=test", dn)
    event = [e for e in core.events if e["event"] == "authentication"][-1]
    assert event["reads_as"] == "cn=proxy,dc=example,dc=test" and event["acting_for"] == dn


def test_a_search_account_reads_for_app_passwords_where_configured(core, tmp_path):
    core.build(app_password_reads="search_account", search_bind_dn="cn=reader,dc=example,dc=test",
               search_bind_password_file=tmp_path / "reader")
    core.directory.add("alice", PRIMARY)
    app = core.admin.create("alice", "appliance").secret
    by_app = decide(core, "alice", app, protocol="ldap")
    assert (by_app.reads_as, by_app.acting_for) == ("cn=reader,dc=example,dc=test", None)


def test_a_right_password_awaiting_its_second_factor_clears_nothing(core):
    core.build(throttle=ThrottleConfig(source_delay=0, source_delay_max=0, account_failures=3))
    core.directory.add("alice", PRIMARY)
    portal = dict(protocol="portal", realm="on-premises", legacy=False, second_factor=True)
    for code in ("111111", "222222", "333333"):
        decision = decide(core, "alice", PRIMARY, **portal)
        assert decision.accepted  # the password; not yet the sign-in
        held = ensureDeferred(core.auth.second_factor_failed(
            attempt("alice", PRIMARY, **portal), decision, code, core.clock.seconds()))
        assert held.called  # no failure delay here
    # Three wrong codes lock the account, right passwords in between or not.
    assert decide(core, "alice", PRIMARY, **portal).reason is Reason.LOCKED_OUT
    audited = [(e["reason"]) for e in core.events if e["event"] == "authentication"]
    assert audited == ["wrong_code", "wrong_code", "wrong_code", "locked_out"]


def test_the_portal_is_not_a_legacy_sign_in_and_never_takes_an_app_password(core):
    core.build(policy=PolicyConfig(block_legacy_auth=True))
    core.directory.add("alice", PRIMARY, modern_auth_only=True)
    app = core.admin.create("alice", "phone").secret
    portal = dict(protocol="portal", realm="on-premises", legacy=False)
    assert decide(core, "alice", PRIMARY, **portal).reason is Reason.PRIMARY
    assert decide(core, "alice", app, **portal).reason is Reason.WRONG_SECRET
    assert decide(core, "alice", app).reason is Reason.LEGACY_BLOCKED


def test_the_fast_path_answers_only_what_the_core_would_and_nothing_revoked(core):
    core.build(account_cache=3600.0)
    core.directory.add("alice", PRIMARY)
    fast = lambda secret, **kw: core.auth.decide_cached(attempt("alice", secret, **kw))  # noqa: E731
    app = core.admin.create("alice", "phone").secret
    assert fast(app) is None  # nothing in memory yet: the core asks
    assert decide(core, "alice", app).accepted
    decision = fast(app)
    assert decision.reason is Reason.APP_PASSWORD and decision.app_password.name == "phone"
    assert decision.revision == core.auth.revision
    assert fast(app.upper()) is not None  # any case, as the core takes it
    assert fast(PRIMARY) is None and fast("wrong-secret") is None
    audited = [e for e in core.events if e["event"] == "authentication"]
    assert [e["reason"] for e in audited][-3:] == ["app_password", "app_password", "app_password"]
    # Deleted: the change feed drops it from the cache at once.
    core.admin.delete("alice", "phone")
    ensureDeferred(core.auth.poll_changes())
    assert fast(app) is None and decide(core, "alice", app).reason is Reason.WRONG_SECRET
    # Expired.
    soon = core.admin.create("alice", "soon", expires_at=core.clock.seconds() + 90).secret
    assert decide(core, "alice", soon).accepted and fast(soon) is not None
    core.clock.advance(31)
    assert fast(soon) is None and decide(core, "alice", soon).reason is Reason.EXPIRED
    # All revoked; out of scope; out of its network.
    other = core.admin.create("alice", "other", protocols=frozenset({"imap"}),
                              networks=("192.0.2.0/24",)).secret
    assert decide(core, "alice", other).accepted and fast(other) is not None
    assert fast(other, protocol="smtp") is None and fast(other, address="198.51.100.1") is None
    core.admin.revoke_all("alice")
    ensureDeferred(core.auth.poll_changes())
    assert fast(other) is None
    # Blocked legacy authentication; a lockout; a disabled account once the
    # account cache expires; a password change.
    last = core.admin.create("alice", "last").secret
    assert decide(core, "alice", last).accepted and fast(last) is not None
    core.auth.policy = attrs.evolve(core.auth.policy, block_legacy_auth=True)
    assert fast(last) is None
    core.auth.policy = attrs.evolve(core.auth.policy, block_legacy_auth=False)
    for familiar in (True, False):
        core.auth.throttle.impose(core.directory.accounts["alice"].key, familiar,
                                  core.clock.seconds() + 60)
    assert fast(last) is None
    core.auth.unlock("alice")
    assert fast(last) is not None
    core.directory.change("alice", password_changed_at=core.clock.seconds() + 1)
    core.clock.advance(3601)
    assert fast(last) is None
    assert decide(core, "alice", last).reason is Reason.REVOKED_BY_PASSWORD_CHANGE
    assert fast(last) is None


def test_a_secret_retried_costs_one_store_lookup_and_a_new_state_is_seen_at_once(core):
    core.build(account_cache=60.0)

    def at_once(core, *args):
        d = ensureDeferred(core.auth.authenticate(attempt(*args)))
        assert d.called  # no failure delays here: the clock stands still
        return d.result

    core.directory.add("alice", PRIMARY)
    created = core.admin.create("alice", "phone")
    pool = core.auth._store._pool
    stale = "abcd efgh ijkl mnop"  # a deleted app password's, retried by its device
    assert at_once(core, "alice", stale).reason is Reason.WRONG_SECRET
    calls = pool.calls
    for _ in range(5):
        assert at_once(core, "alice", stale).reason is Reason.WRONG_SECRET
    assert pool.calls == calls  # no store lookup, no user read: both remembered
    # Every refusal still counted and audited.
    refused = [e for e in core.events if e.get("reason") == "wrong_secret"]
    assert len(refused) == 6
    # The real one still passes: remembering misses spares nothing else.
    assert at_once(core, "alice", created.secret).accepted
    # The user made MFA-required in the store: seen with the next change, at once.
    assert at_once(core, "alice", PRIMARY).accepted
    core.admin.set_mfa("alice", MfaState.ENFORCED)
    ensureDeferred(core.auth.poll_changes())
    assert at_once(core, "alice", PRIMARY).reason is Reason.MFA_REQUIRED
    # Misses are forgotten after a minute.
    core.clock.advance(61)
    calls = pool.calls
    assert at_once(core, "alice", stale).reason is Reason.MFA_REQUIRED
    assert pool.calls == calls + 2  # looked up again, and the user read again


def test_a_change_feed_outage_is_said_once_as_a_warning_and_once_when_it_ends(core):
    from twisted.logger import LogLevel, globalLogPublisher

    from proxy.store import StoreError

    core.build()
    events: list = []
    globalLogPublisher.addObserver(events.append)
    read = core.store.changes_since

    def down(seq):
        raise StoreError("the store does not answer")

    try:
        core.store.changes_since = down
        for _ in range(5):
            ensureDeferred(core.auth.poll_changes())
        core.store.changes_since = read
        ensureDeferred(core.auth.poll_changes())
        ensureDeferred(core.auth.poll_changes())
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [(e["log_level"], e["log_format"]) for e in events
            if e.get("log_namespace") == "legacy_auth_proxy.auth"]
    assert said == [(LogLevel.warn, "cannot read the store's change feed: {error}; retrying"),
                    (LogLevel.info, "the store's change feed is read again")]


def test_an_inactive_accounts_refusal_says_why_in_the_audit(core):
    core.build()
    core.directory.add("alice", PRIMARY)
    core.directory.change("alice", active=False, inactive_reason="password_must_change")
    assert decide(core, "alice", PRIMARY, realm="on-premises").reason is Reason.ACCOUNT_INACTIVE
    (event,) = [e for e in core.events if e["event"] == "authentication"]
    assert event["account_state"] == "password_must_change"


def test_an_app_password_tried_while_its_account_is_inactive_works_once_it_is_active_again(core):
    """A refused account goes a stand-in's steps under its name as typed:
    the stand-in's store look-up must not leave its real app password
    remembered as missing."""
    core.build()
    core.directory.add("alice", PRIMARY)
    app = core.admin.create("alice", "phone").secret
    core.directory.change("alice", active=False)
    refused = ensureDeferred(core.auth.authenticate(attempt("alice", app)))
    core.clock.advance(1)  # well within the time a missing key is remembered
    assert refused.result.reason is Reason.ACCOUNT_INACTIVE
    core.directory.change("alice", active=True)
    assert decide(core, "alice", app).reason is Reason.APP_PASSWORD


def test_a_refused_accounts_stand_in_reads_the_store_as_an_unknown_names_does(core):
    """With the account cache on, each name's user state is read from the
    store once: an inactive account's refusal drops its own (it stops the
    user's sessions), and its stand-in's must not go with it, or each of its
    tries would make a store read that an unknown name's do not."""
    core.build(account_cache=30.0)
    core.directory.add("alice", PRIMARY)
    core.directory.add("gone", PRIMARY)
    core.directory.change("gone", active=False)
    reads: list[str] = []
    get_user = core.store.get_user

    def counted(username):
        reads.append(username)
        return get_user(username)

    core.store.get_user = counted
    for name in ("alice", "nobody", "gone"):
        for i in range(3):
            d = ensureDeferred(core.auth.authenticate(attempt(name, f"Guess-{i}")))
            core.clock.advance(1)  # within the account cache's time
            assert not d.result.accepted
    assert sorted(reads) == [" gone", " nobody", "alice"]  # a stand-in's: a name no one has


def directory_checks(core):
    """The passwords the directory is asked to check, from now on."""
    checked = []
    check = core.directory.check_password

    async def counted(dn, password):
        checked.append(password)
        return await check(dn, password)

    core.directory.check_password = counted
    return checked


def tried(core, process, secret, realm, protocol):
    """alice's ``secret`` from an address that is counted, on ``process``."""
    d = ensureDeferred(process.authenticate(attempt(
        "alice", secret, realm=realm, protocol=protocol, address="198.51.100.7")))
    core.clock.advance(0.1)  # no failure delay: only the held refusal's moment
    return d.result.reason


def test_a_guess_answered_otherwise_elsewhere_stays_counted_in_the_store(core):
    """A wrong guess counted in the store by one process, tried again in
    another where the answer is not a wrong secret (MFA required on a cloud
    listener), is not taken back by that check: it was never that check's
    own. Otherwise each process would give the guesser a budget of its own."""
    core.build(throttle=ThrottleConfig(source_delay=0, source_delay_max=0, account_failures=5,
                                       lockout=600), shared_failures=True)
    core.directory.add("alice", PRIMARY, mfa_enforced=True)
    checked = directory_checks(core)
    first, second, third = core.auth, core.sibling(), core.sibling()

    for i in range(4):  # each checked by the first, then tried on the second's cloud listener
        assert tried(core, first, f"guess{i}", "on-premises", "ldap") is Reason.WRONG_SECRET
        assert tried(core, second, f"guess{i}", "cloud", "imap") is Reason.MFA_REQUIRED
    for i in range(8):
        tried(core, third, f"more{i}", "on-premises", "ldap")
    assert len(set(checked)) == 5  # the one budget of every process sharing the store


def test_an_unlock_while_a_process_starts_reaches_it(core):
    core.build(throttle=ThrottleConfig(source_delay=0, source_delay_max=0, account_failures=3,
                                       lockout=600), shared_failures=True)
    core.directory.add("alice", PRIMARY)
    ensureDeferred(core.auth.start(poll_interval=1.0))
    for i in range(3):
        decide(core, "alice", f"wrong{i}")
    starting = core.sibling()
    read = starting._store.lockouts  # noqa: SLF001 (the moment the test needs)

    def then_unlocked(*args):
        # The help desk lifts the lockout just after the starting process
        # has read the lockouts in force.
        return read(*args).addCallback(lambda found: (core.admin.unlock("alice"), found)[1])

    starting._store.lockouts = then_unlocked
    ensureDeferred(starting.start(poll_interval=1.0))
    core.clock.advance(2)  # the feed is read
    d = ensureDeferred(starting.authenticate(attempt("alice", PRIMARY)))
    core.clock.advance(1)
    assert d.result.accepted
    for process in (core.auth, starting):
        ensureDeferred(process.stop())


def test_a_sign_in_from_home_forgives_the_typos_before_it_in_the_shared_store_too(core):
    core.build(throttle=ThrottleConfig(source_delay=0, source_delay_max=0, account_failures=5,
                                       lockout=600), shared_failures=True)
    core.directory.add("alice", PRIMARY)
    assert decide(core, "alice", PRIMARY).accepted  # home becomes familiar
    for i in range(4):
        assert decide(core, "alice", f"typo{i}").reason is Reason.WRONG_SECRET
    assert decide(core, "alice", PRIMARY).accepted  # forgives the four
    assert decide(core, "alice", "typo4").reason is Reason.WRONG_SECRET
    assert decide(core, "alice", PRIMARY).accepted  # one typo since, not five


def test_a_guess_refused_as_mfa_required_is_counted_in_the_store_when_it_is_checked(core):
    """A guess first answered MFA-required on a cloud listener (counted in
    memory only: often the user's right password), then tried where the
    directory checks it, is a guess like any other for the shared store."""
    core.build(throttle=ThrottleConfig(source_delay=0, source_delay_max=0, account_failures=3,
                                       lockout=600), shared_failures=True)
    core.directory.add("alice", PRIMARY, mfa_enforced=True)
    checked = directory_checks(core)

    for p, process in enumerate([core.auth, core.sibling(), core.sibling()]):
        for i in range(2):
            tried(core, process, f"guess{p}-{i}", "cloud", "imap")
            tried(core, process, f"guess{p}-{i}", "on-premises", "ldap")
    assert len(set(checked)) == 3  # the one budget of every process sharing the store


def test_a_stale_password_retried_after_the_window_fills_no_budget_in_the_store(core):
    """A phone retrying its old password is one of the place's last wrong
    secrets: not counted again here, nor in the shared store, whose row of
    it the window has forgotten."""
    core.build(throttle=ThrottleConfig(source_delay=0, source_delay_max=0, account_failures=3,
                                       failure_window=900), shared_failures=True)
    core.directory.add("alice", PRIMARY)
    assert decide(core, "alice", "old-password").reason is Reason.WRONG_SECRET
    core.clock.advance(1000)  # past the window
    for typo in ("typo1", "typo2"):
        assert decide(core, "alice", typo).reason is Reason.WRONG_SECRET
    assert decide(core, "alice", "old-password").reason is Reason.WRONG_SECRET
    assert decide(core, "alice", PRIMARY).accepted


def test_a_lockout_another_process_decided_is_seen_by_the_portals_checks_here(core):
    """The portal (its sign-in, the help desk's page) and access tokens ask
    the core whether an account is locked: the lockouts decided elsewhere
    through the shared store count there as at a password's check."""
    core.build(throttle=ThrottleConfig(source_delay=0, source_delay_max=0, account_failures=3,
                                       lockout=600), shared_failures=True)
    alice = core.directory.add("alice", PRIMARY)
    here, there = core.auth, core.sibling()
    for process in (here, there):
        ensureDeferred(process.start(poll_interval=1.0))
    for i in range(3):
        decide(core, "alice", f"wrong{i}")
    assert here.locked(alice) > 0
    assert there.locked(alice) > 0
    for process in (here, there):
        ensureDeferred(process.stop())


def test_a_lockout_lifted_while_the_store_counted_its_last_failure_stays_lifted(core):
    core.build(throttle=ThrottleConfig(source_delay=0, source_delay_max=0, account_failures=3,
                                       lockout=600), shared_failures=True)
    alice = core.directory.add("alice", PRIMARY)
    fleet = core.auth._fleet  # noqa: SLF001 (the moment the test needs)
    add = fleet._store.add_failure  # noqa: SLF001

    def unlocked(until):
        if until is not None:  # the help desk lifts it, and the feed says so, meanwhile
            core.admin.unlock("alice")
            core.auth.unlock("alice")
        return until

    def answered_after_an_unlock(*args, **kwargs):
        return add(*args, **kwargs).addCallback(unlocked)

    fleet._store.add_failure = answered_after_an_unlock  # noqa: SLF001
    for i in range(3):
        decide(core, "alice", f"wrong{i}")
    assert core.auth.locked(alice) == 0
    assert decide(core, "alice", PRIMARY).accepted


def test_a_sign_in_forgives_in_the_store_only_what_its_process_forgave(core):
    """Failures another process counted at the same familiar place stay in
    the shared store when this one's sign-in forgives its own."""
    core.build(throttle=ThrottleConfig(source_delay=0, source_delay_max=0, account_failures=4,
                                       lockout=600), shared_failures=True)
    core.directory.add("alice", PRIMARY)
    processes = here, there, third = core.auth, core.sibling(), core.sibling()

    def from_home(process, secret):
        d = ensureDeferred(process.authenticate(attempt("alice", secret)))
        core.clock.advance(0.1)
        return d.result.reason

    for process in processes:  # home is familiar to each
        assert from_home(process, PRIMARY) is Reason.PRIMARY
    for i in range(2):
        assert from_home(there, f"there{i}") is Reason.WRONG_SECRET
    assert from_home(here, "here0") is Reason.WRONG_SECRET
    assert from_home(here, PRIMARY) is Reason.PRIMARY  # forgives here0, not there's two
    for i in range(2):
        assert from_home(third, f"third{i}") is Reason.WRONG_SECRET  # the fourth in the store
    assert from_home(third, PRIMARY) is Reason.LOCKED_OUT


def test_the_help_desk_lists_who_is_locked_out_by_any_process_sharing_the_store(core):
    """Lockouts are listed by user name, longest first, and those decided
    by another process reach this one's list through the change feed."""
    core.build(throttle=ThrottleConfig(source_delay=0, source_delay_max=0, account_failures=3,
                                       lockout=600), shared_failures=True)
    here, there = core.auth, core.sibling()
    core.directory.add("alice", PRIMARY)
    core.directory.add("bob", PRIMARY)
    for process in (here, there):
        ensureDeferred(process.start(poll_interval=3600))
    for i in range(3):
        decide(core, "alice", f"wrong{i}")
    assert here.locked_out() == [("alice", 600 - 60)]  # decide() waits a minute after it
    assert there.locked_out() == []
    ensureDeferred(there.poll_changes())
    core.clock.advance(0)
    assert there.locked_out() == [("alice", 600 - 60)]
    core.clock.advance(10)
    for i in range(3):
        ensureDeferred(there.authenticate(attempt("bob", f"wrong{i}")))
    core.clock.advance(60)
    assert [name for name, _ in there.locked_out()] == ["bob", "alice"]
    here.unlock("alice")
    assert here.locked_out() == []
    for process in (here, there):
        ensureDeferred(process.stop())
