"""Active Directory, proven against a real domain controller: Samba's AD DC
(tests/samba.py), with ``directory.kind: active_directory``.

The authentication core (the Authenticator, the real directory client, a
real SQLite store) as tests/integration/test_authenticator.py drives it
against slapd: every name a person types is one account; the account's
state read the AD way; nested and primary groups; AD's own lockout never
fed by the proxy; TLS to the DC, password changes and the DC going away.
"""

from __future__ import annotations

import statistics
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from proxy.auth import Reason
from proxy.config import ThrottleConfig
from proxy.directory import Directory, Domain, ad_inactive_reason, filetime
from proxy.store import MfaState
from tests.integration.test_authenticator import EXPECTED, STATES, Env, attempt, sleep

PRIMARY = "Primary-Passw0rd"
# A limit for a DC that does not answer, not a timing: the DC serves one
# request at a time (samba -M single), and on a loaded machine its StartTLS
# has taken over 3 s (Env's default).
AD = {"kind": "active_directory", "timeout": 15.0}


@pytest_twisted.async_yield_fixture
async def ad(samba, tmp_path):
    """An Env (see test_authenticator) whose directory is the Samba DC."""
    e = Env(samba, tmp_path)
    yield e
    await e.close()


def names_of(samba, sam: str, dn: str) -> list[str]:
    """Every form of the user's name a client may type."""
    return [
        sam, sam.upper(),
        f"EXAMPLE\\{sam}", f"example\\{sam}", f"Example\\{sam.upper()}",
        f"{sam}@ad.example.test", f"{sam}@AD.Example.Test",  # the implicit UPN
        f"{sam}@alt.example.test",  # the UPN, of an alternative suffix
        f"{sam}.mail@example.test",  # mail
        dn,
    ]


# -- 1. one account, whatever name the client types ----------------------------------


@pytest_twisted.ensureDeferred
async def test_every_name_form_is_one_account_one_key_one_audit_name(ad, samba, unique):
    auth = await ad.make(**AD)
    sam = unique("ad")
    dn = samba.add_user(sam, PRIMARY, upn=f"{sam}@alt.example.test")
    secret = ad.admin.create(sam, "phone").secret
    for name in names_of(samba, sam, dn):
        for realm, secret_, reason in (("cloud", secret, Reason.APP_PASSWORD),
                                       ("on-premises", PRIMARY, Reason.PRIMARY)):
            decision = await auth.authenticate(attempt(name, secret_, realm=realm))
            assert decision.reason is reason, name
            assert decision.username == sam and decision.account.dn == dn, name
    audited = {e["user"] for e in ad.events if e["event"] == "authentication"}
    assert audited == {sam}


@pytest_twisted.ensureDeferred
async def test_one_lockout_counter_across_every_name_form(ad, samba, unique):
    auth = await ad.make(throttle=ThrottleConfig(source_delay=0, source_delay_max=0,
                                                 account_failures=3), **AD)
    sam = unique("ad")
    dn = samba.add_user(sam, PRIMARY)
    names = [f"EXAMPLE\\{sam}", f"{sam}@ad.example.test", f"{sam}.mail@example.test"]
    for i, name in enumerate(names):
        decision = await auth.authenticate(attempt(name, f"wrong-{i}", realm="on-premises"))
        assert decision.reason is Reason.WRONG_SECRET
    # Three failures under three names: the account is locked under a fourth.
    decision = await auth.authenticate(attempt(sam.upper(), PRIMARY, realm="on-premises"))
    assert decision.reason is Reason.LOCKED_OUT
    assert decision.account.dn == dn


@pytest_twisted.ensureDeferred
async def test_another_domain_and_names_that_match_two_accounts_match_nobody(ad, samba, unique):
    auth = await ad.make(**AD)
    one, two = unique("ad"), unique("ad")
    samba.add_user(one, PRIMARY, mail=f"shared-{one}@example.test")
    samba.add_user(two, PRIMARY, upn=f"shared-{one}@example.test")
    # (A UPN equal to another account's sam@<the domain> the DC refuses itself.)
    for name in (f"OTHER\\{one}", f"\\{one}", f"shared-{one}@example.test"):
        decision = await auth.authenticate(attempt(name, PRIMARY, realm="on-premises"))
        assert decision.reason is Reason.UNKNOWN_USER, name
    assert auth.directory.binds == 0
    # Each by a name that is its own alone.
    for name in (one, two):
        decision = await auth.authenticate(attempt(name, PRIMARY, realm="on-premises"))
        assert decision.reason is Reason.PRIMARY


def test_the_preset_sets_what_an_operator_would_set_by_hand(samba, tmp_path):
    config = Env(samba, tmp_path).directory_config(**AD)
    assert config.username_attribute == "sAMAccountName"
    assert "userPrincipalName={username}" in config.user_filter
    assert config.active_filter is None and config.password_changed_attribute == "pwdLastSet"
    # A key set by hand wins over the preset.
    assert Env(samba, tmp_path).directory_config(
        username_attribute="userPrincipalName", **AD).username_attribute == "userPrincipalName"


# -- 2. account state, the AD way ---------------------------------------------------------


def _restore(samba, sam, how):
    if how == "disabled":
        samba.enable(sam)
    elif how == "locked":
        samba.unlock(sam)
    elif how == "expired":
        samba.set_account_expires(sam, None)
    elif how == "password_must_change":
        samba.set_password(sam, PRIMARY)


@pytest.mark.parametrize("how", ["disabled", "locked", "expired", "password_must_change"])
@pytest_twisted.ensureDeferred
async def test_an_account_ad_stops_is_refused_on_every_path_at_once(ad, samba, unique, how):
    auth = await ad.make(**AD)
    sam = unique("ad")
    samba.add_user(sam, PRIMARY)
    secret = ad.admin.create(sam, "phone").secret
    assert (await auth.authenticate(attempt(sam, secret))).accepted
    assert (await auth.authenticate(attempt(sam, PRIMARY, realm="on-premises"))).accepted
    if how == "disabled":
        samba.disable(sam)
    elif how == "locked":
        samba.lock_by_wrong_passwords(sam)
        assert samba.lockout_time(sam) != 0
    elif how == "expired":
        samba.set_account_expires(sam, time.time() - 60)
    else:
        samba.set_password(sam, PRIMARY, must_change=True)
    binds = auth.directory.binds
    for realm, secret_ in (("cloud", secret), ("cloud", PRIMARY), ("on-premises", PRIMARY)):
        decision = await auth.authenticate(attempt(sam, secret_, realm=realm))
        assert decision.reason is Reason.ACCOUNT_INACTIVE, realm
        assert decision.account.inactive_reason == how
    assert auth.directory.binds == binds  # the DC is not asked to check a password
    _restore(samba, sam, how)
    assert (await auth.authenticate(attempt(sam, PRIMARY, realm="on-premises"))).accepted


@pytest_twisted.ensureDeferred
async def test_a_deleted_account_is_nobody_under_every_name(ad, samba, unique):
    auth = await ad.make(**AD)
    sam = unique("ad")
    dn = samba.add_user(sam, PRIMARY, upn=f"{sam}@alt.example.test")
    secret = ad.admin.create(sam, "phone").secret
    assert (await auth.authenticate(attempt(sam, secret))).accepted
    samba.delete(sam)
    for name in names_of(samba, sam, dn):
        decision = await auth.authenticate(attempt(name, secret))
        assert decision.reason is Reason.UNKNOWN_USER, name


@pytest_twisted.ensureDeferred
async def test_a_password_set_on_the_dc_takes_effect_at_once_and_revokes_older_app_passwords(
        ad, samba, unique):
    auth = await ad.make(**AD)
    sam = unique("ad")
    samba.add_user(sam, PRIMARY)
    secret = ad.admin.create(sam, "phone").secret
    assert (await auth.authenticate(attempt(sam, secret))).accepted
    await sleep(1.1)  # pwdLastSet after the app password's creation, in whole seconds too
    samba.set_password(sam, "Changed-Passw0rd")
    old = await auth.authenticate(attempt(sam, PRIMARY, realm="on-premises"))
    new = await auth.authenticate(attempt(sam, "Changed-Passw0rd", realm="on-premises"))
    assert old.reason is Reason.WRONG_SECRET and new.reason is Reason.PRIMARY
    decision = await auth.authenticate(attempt(sam, secret))
    assert decision.reason is Reason.REVOKED_BY_PASSWORD_CHANGE
    newer = ad.admin.create(sam, "new phone").secret
    assert (await auth.authenticate(attempt(sam, newer))).accepted


def test_lockout_time_counts_only_within_the_domains_lockout_duration():
    domain = Domain(dn="DC=x", dns_name="x", netbios="X", lockout_duration=1800.0,
                    lockout_threshold=5)
    now = 2_000_000_000.0
    ticks = lambda seconds: int((seconds + 11_644_473_600) * 10_000_000)  # noqa: E731
    assert filetime(ticks(now)) == pytest.approx(now)

    def reason(**values):
        values = {"pwdLastSet": str(ticks(now - 86400)), **values}
        return ad_inactive_reason(lambda a: values.get(a, "").encode() or None, now, domain)

    assert reason(userAccountControl="512") is None
    assert reason(userAccountControl="514") == "disabled"
    assert reason(lockoutTime=str(ticks(now - 60))) == "locked"
    assert reason(lockoutTime=str(ticks(now - 1801))) is None  # lapsed; AD clears it at sign-in
    assert reason(lockoutTime="0") is None
    forever = Domain(dn="DC=x", dns_name="x", netbios="X", lockout_duration=None,
                     lockout_threshold=5)
    assert ad_inactive_reason(lambda a: str(ticks(now - 10**7)).encode()
                              if a == "lockoutTime" else None, now, forever) == "locked"
    for never in ("0", "9223372036854775807"):
        assert reason(accountExpires=never) is None
    assert reason(accountExpires=str(ticks(now + 60))) is None
    assert reason(accountExpires=str(ticks(now - 60))) == "expired"
    assert reason(pwdLastSet="0") == "password_must_change"


def test_name_forms():
    domain = Domain(dn="DC=ad,DC=example,DC=test", dns_name="ad.example.test",
                    netbios="EXAMPLE", lockout_duration=None, lockout_threshold=0)
    assert domain.names_for("example\\alice") == ["alice"]
    assert domain.names_for("OTHER\\alice") is None
    assert domain.names_for("EXAMPLE\\") is None
    assert domain.names_for("alice@AD.example.test") == ["alice@AD.example.test", "alice"]
    assert domain.names_for("alice@alt.example.test") == ["alice@alt.example.test"]
    assert domain.names_for("alice") == ["alice"]


# -- 3. groups as AD has them -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nested_groups_and_the_primary_group_count(ad, samba, unique):
    nested, primary, admin = unique("ad"), unique("ad"), unique("ad")
    for sam in (nested, primary, admin):
        samba.add_user(sam, PRIMARY)
    # nested is in a group that is in a group that is in mfa.
    inner, middle = unique("grp"), unique("grp")
    samba.add_group(middle)
    samba.add_to_group("mfa", middle)
    samba.add_group(inner, nested)
    samba.add_to_group(middle, inner)
    # primary's primary group is modern-auth-only: memberOf does not list it.
    samba.set_primary_group(primary, "modern-auth-only")
    assert "modern-auth-only" not in str(samba.search(samba.user_dn(primary), "memberOf"))
    # admin is in admins through a group.
    staff = unique("grp")
    samba.add_group(staff, admin)
    samba.add_to_group("admins", staff)
    # Made after the directory is set up: samba-tool blocks the reactor,
    # which would time out the connections being opened meanwhile.
    auth = await ad.make(**AD)
    assert (await auth.authenticate(attempt(nested, PRIMARY))).reason is Reason.MFA_REQUIRED
    assert (await auth.authenticate(attempt(nested, PRIMARY, realm="on-premises"))).accepted
    assert (await auth.authenticate(attempt(primary, PRIMARY, realm="on-premises"))).reason \
        is Reason.LEGACY_BLOCKED
    decision = await auth.authenticate(attempt(admin, PRIMARY, realm="on-premises"))
    assert decision.accepted and decision.administrator


@pytest.mark.parametrize("state", STATES)
@pytest_twisted.ensureDeferred
async def test_decision_table_on_the_dc(ad, samba, unique, state):
    """test_authenticator's decision table, the groups reached through a
    nested group and the inactive account disabled in AD."""
    sam = unique("ad")
    if state != "unknown":
        samba.add_user(sam, PRIMARY, disabled=state == "inactive")
    if state in ("mfa-group", "modern-auth-only"):
        via = unique("grp")
        samba.add_group(via, sam)
        samba.add_to_group("mfa" if state == "mfa-group" else state, via)
    if state in ("enabled", "enforced"):
        ad.admin.set_mfa(sam, MfaState(state))
    secret = ad.admin.create(sam, "phone").secret
    auth = await ad.make(**AD)
    secrets = {"app": secret, "primary": PRIMARY, "wrong": "not-the-password"}
    for realm, expected in zip(("cloud", "on-premises"), EXPECTED[state]):
        for kind, reason in zip(("app", "primary", "wrong"), expected):
            decision = await auth.authenticate(attempt(f"EXAMPLE\\{sam}", secrets[kind],
                                                       realm=realm))
            assert decision.reason.value == reason, (realm, kind)


# -- 4. never feed AD's own lockout --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_wrong_app_passwords_never_reach_the_dc(ad, samba, unique):
    auth = await ad.make(**AD)
    sam = unique("ad")
    samba.add_user(sam, PRIMARY, groups=["mfa"])
    ad.admin.create(sam, "phone")
    for i in range(50):
        guess = "".join(chr(ord("a") + (i * 7 + j) % 26) for j in range(16))
        decision = await auth.authenticate(attempt(sam, guess, address=f"192.0.2.{i + 1}"))
        assert not decision.accepted
    assert auth.directory.binds == 0
    assert samba.bad_password_count(sam) == 0 and samba.lockout_time(sam) == 0


@pytest_twisted.ensureDeferred
async def test_primary_failures_stop_at_the_proxys_threshold_below_the_dcs(ad, samba, unique):
    below = samba.lockout_threshold - 2
    auth = await ad.make(throttle=ThrottleConfig(source_delay=0, source_delay_max=0,
                                                 account_failures=below), **AD)
    sam = unique("ad")
    dn = samba.add_user(sam, PRIMARY)
    reasons = [(await auth.authenticate(attempt(sam, f"wrong-{i}", realm="on-premises"))).reason
               for i in range(20)]
    assert reasons[:below] == [Reason.WRONG_SECRET] * below
    assert set(reasons[below:]) == {Reason.LOCKED_OUT}
    assert samba.bad_password_count(sam) == below
    assert samba.lockout_time(sam) == 0
    # Locked by the proxy only: the user can still sign in at the DC itself.
    assert samba.bind(dn, PRIMARY).returncode == 0


@pytest_twisted.ensureDeferred
async def test_a_secret_the_dc_refused_is_not_sent_again(ad, samba, unique):
    auth = await ad.make(**AD)
    sam = unique("ad")
    samba.add_user(sam, PRIMARY)
    for _ in range(10):  # a phone retrying a stale password
        decision = await auth.authenticate(attempt(sam, "Stale-Passw0rd", realm="on-premises"))
        assert decision.reason is Reason.WRONG_SECRET
    assert auth.directory.binds == 1
    assert samba.bad_password_count(sam) == 1


# -- 5. binding to the DC as AD requires ------------------------------------------------------


@pytest.mark.parametrize("how", ["ldaps", "starttls"])
@pytest_twisted.ensureDeferred
async def test_tls_to_the_dc_with_its_ca(ad, samba, unique, how):
    url = samba.ldaps_url if how == "ldaps" else samba.url
    auth = await ad.make(url=url, start_tls=True, **AD)
    sam = unique("ad")
    samba.add_user(sam, PRIMARY)
    assert (await auth.authenticate(attempt(sam, PRIMARY, realm="on-premises"))).accepted


@pytest_twisted.ensureDeferred
async def test_the_dc_stopped_is_a_temporary_failure_then_it_comes_back(ad, samba, unique):
    auth = await ad.make(**AD)
    sam = unique("ad")
    samba.add_user(sam, PRIMARY)
    assert (await auth.authenticate(attempt(sam, PRIMARY, realm="on-premises"))).accepted
    samba.stop()
    try:
        for _ in range(2):
            decision = await auth.authenticate(attempt(sam, PRIMARY, realm="on-premises"))
            assert decision.reason is Reason.DIRECTORY_UNAVAILABLE
    finally:
        samba.start()
    for _ in range(100):  # the pools reconnect within their backoff (at most 5 s)
        decision = await auth.authenticate(attempt(sam, PRIMARY, realm="on-premises"))
        if decision.accepted:
            break
        await sleep(0.1)
    assert decision.reason is Reason.PRIMARY


# -- 7. timing: a primary-password sign-in against the DC beside slapd ---------------------


async def _timings(env, server, add, directory, rounds=20):
    """(cold, warm median) seconds of an on-premises primary sign-in: cold,
    the first after the directory client starts (connections opened, and
    for AD the domain read); warm, later ones (each one search and one bind:
    account_cache 0)."""
    auth = await env.make(**directory)
    name = add()
    started = time.perf_counter()
    assert (await auth.authenticate(attempt(name, PRIMARY, realm="on-premises"))).accepted
    cold = time.perf_counter() - started
    warm = []
    for _ in range(rounds):
        started = time.perf_counter()
        assert (await auth.authenticate(attempt(name, PRIMARY, realm="on-premises"))).accepted
        warm.append(time.perf_counter() - started)
    return cold, statistics.median(warm)


@pytest_twisted.ensureDeferred
async def test_timing_of_a_primary_sign_in_against_the_dc_and_slapd(samba, slapd, unique,
                                                                    tmp_path):
    """Measured, not judged: printed for docs/active-directory.md (-s)."""
    results = {}
    for label, server, add, directory in (
        ("Samba AD DC", samba, lambda: _added(samba, unique("ad")), AD),
        ("slapd", slapd, lambda: _added_slapd(slapd, unique()), {}),
    ):
        folder = tmp_path / label.replace(" ", "-")
        folder.mkdir()
        env = Env(server, folder)
        try:
            results[label] = await _timings(env, server, add, directory)
        finally:
            for step in reversed(env.teardown):
                result = step()
                if result is not None:
                    await result
            env.cli_store.close()
    for label, (cold, warm) in results.items():
        print(f"\n{label}: cold {cold * 1000:.1f} ms, warm {warm * 1000:.1f} ms (median of 20)")


def _added(samba, sam):
    samba.add_user(sam, PRIMARY)
    return sam


def _added_slapd(slapd, uid):
    slapd.add_user(uid, PRIMARY)
    return uid


def test_the_directory_client_needs_no_active_filter_search_on_ad(samba, tmp_path):
    """The state comes with the entry: one search fewer per look-up."""
    config = Env(samba, tmp_path).directory_config(**AD)
    directory = Directory(reactor, config, samba.service_password, samba.ca_file.read_bytes())
    assert {"userAccountControl", "lockoutTime", "accountExpires", "pwdLastSet"} <= set(
        directory._attributes)
