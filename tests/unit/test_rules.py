"""The rules of a sign-in, as pure functions: what both the fast path and
the slow path ask (proxy.auth.rules)."""

from __future__ import annotations

import attrs

from proxy.auth import Attempt, Reason, rules
from proxy.config import DirectoryConfig, PolicyConfig
from proxy.directory import Account
from proxy.store import AppPassword

NOW = 10_000.0
ALICE = Account(dn="uid=alice,ou=people,dc=example,dc=test", username="alice", active=True)


def attempt(**kw):
    fields = dict(protocol="imap", realm="cloud", username="alice", secret="s3cret",
                  client_address="192.0.2.1", tls=True)
    return Attempt(**{**fields, **kw})


def record(**kw):
    fields = dict(id="ap1", username="alice", name="phone", created_at=NOW - 100,
                  created_by="cli:test")
    return AppPassword(**{**fields, **kw})


def test_screening_before_anything_is_looked_up():
    policy = PolicyConfig()
    assert rules.screen(attempt(), policy) is None
    assert rules.screen(attempt(tls=False), policy).reason is Reason.PLAINTEXT
    assert rules.screen(attempt(tls=False, plaintext_allowed=True), policy) is None
    for name in ("", " ", "a\x00b", "a\rb", "x" * 257):
        assert rules.screen(attempt(username=name), policy).reason is Reason.MALFORMED
    assert rules.screen(attempt(secret=" "), policy).reason is Reason.MALFORMED
    assert rules.screen(attempt(secret="x" * 1025), policy).reason is Reason.MALFORMED
    assert rules.screen(attempt(authzid="bob"), policy).reason is Reason.FOREIGN_AUTHZID
    assert rules.screen(attempt(authzid="ALICE"), policy) is None
    blocked = PolicyConfig(block_legacy_auth=True)
    assert rules.screen(attempt(), blocked).reason is Reason.LEGACY_BLOCKED
    assert rules.screen(attempt(legacy=False), blocked) is None


def test_accounts_refused_whatever_the_secret():
    assert rules.account_refusal(attempt(), ALICE) is None
    inactive = attrs.evolve(ALICE, active=False)
    assert rules.account_refusal(attempt(), inactive).reason is Reason.ACCOUNT_INACTIVE
    modern = attrs.evolve(ALICE, modern_auth_only=True)
    assert rules.account_refusal(attempt(), modern).reason is Reason.LEGACY_BLOCKED
    assert rules.account_refusal(attempt(legacy=False), modern) is None


def test_an_app_password_that_is_the_secret():
    policy = PolicyConfig(app_password_idle_expiry=86400.0)
    assert rules.app_password(attempt(), ALICE, record(), NOW, policy).accepted
    expired = record(expires_at=NOW - 1)
    assert rules.app_password(attempt(), ALICE, expired, NOW, policy).reason is Reason.EXPIRED
    idle = record(created_at=NOW - 2 * 86400)
    assert rules.app_password(attempt(), ALICE, idle, NOW, policy).reason is Reason.UNUSED
    smtp = record(protocols=frozenset({"smtp"}))
    assert rules.app_password(attempt(), ALICE, smtp, NOW, policy).reason is Reason.OUT_OF_SCOPE
    office = record(networks=("198.51.100.0/24",))
    assert rules.app_password(attempt(), ALICE, office, NOW, policy).reason is Reason.OUT_OF_SCOPE
    changed = attrs.evolve(ALICE, password_changed_at=NOW - 50)
    assert rules.app_password(attempt(), changed, record(), NOW, policy).reason is (
        Reason.REVOKED_BY_PASSWORD_CHANGE)


def test_who_needs_an_app_password_and_with_whose_rights_ldap_reads():
    assert rules.mfa_required(ALICE, True)
    assert rules.mfa_required(attrs.evolve(ALICE, mfa_enforced=True), False)
    assert not rules.mfa_required(ALICE, False)
    assert rules.takes_app_passwords(attempt())
    assert not rules.takes_app_passwords(attempt(realm="on-premises"))
    assert not rules.takes_app_passwords(attempt(legacy=False))
    config = DirectoryConfig(url="ldap://d", bind_dn="cn=proxy", bind_password_file="/x",
                             user_base="ou=people", search_bind_dn="cn=reader")
    assert rules.reads(config, ALICE, False) == (ALICE.dn, None)
    assert rules.reads(config, ALICE, True)[1] in (ALICE.dn, None)
    assert rules.too_many_sessions(3, 3) and not rules.too_many_sessions(2, 3)
