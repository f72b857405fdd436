"""The core's decision on a sign-in with an OAuth access token, on a
task.Clock with a fake directory: the token first, then the user it names,
then the account as for any sign-in; audited like every decision."""

from __future__ import annotations

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from twisted.internet.defer import Deferred, ensureDeferred

from proxy.auth import Attempt, Outcome, Reason
from proxy.auth.bearer import BearerTokens
from proxy.config import PolicyConfig
from tests.unit.fakes import Core

ISSUER = "https://idp.example.test"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)


def token(sub="alice", **claims):
    body = {"iss": ISSUER, "aud": "mail", "sub": sub, "exp": 10_000 + 100_000, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode({"alg": "RS256", "kid": "k1"}, body, KEY)


@pytest.fixture
def core(tmp_path):
    core = Core(tmp_path)
    core.clock.advance(10_000)
    core.build()

    async def fetch():
        if fetch.down:
            raise ConnectionRefusedError("down")
        return KeySet([KEY]).as_dict(private=False)

    fetch.down = False

    core.auth.bearer = BearerTokens(clock=core.clock, fetch_keys=fetch, issuer=ISSUER,
                                    audiences=("mail",), username_claims=("sub", "email"))
    core.directory.add("alice", "Primary-Passw0rd")
    return core


def decide(core, username, secret, realm="cloud", **kw):
    attempt = Attempt(protocol="imap", realm=realm, username=username, secret=secret,
                      client_address="192.0.2.10", tls=True, **{"bearer": True, **kw})
    d = ensureDeferred(core.auth.authenticate(attempt))
    core.clock.advance(60)
    assert d.called
    return d.result


def test_a_good_token_signs_its_user_in_and_is_audited(core):
    decision = decide(core, "alice", token())
    assert decision.reason is Reason.BEARER_TOKEN and decision.accepted
    assert decision.account is not None and decision.app_password is None
    assert not decision.read_only  # the user's own sign-in, as with the primary password
    event = core.events[-1]
    assert (event["event"], event["reason"], event["user"]) == ("authentication", "bearer_token", "alice")
    assert all(token() not in str(v) for v in event.values())


def test_the_decision_table(core):
    core.directory.add("bob", "Primary-Passw0rd")
    core.directory.add("gone", "Primary-Passw0rd")
    core.directory.change("gone", active=False)
    core.directory.add("mo", "Primary-Passw0rd", modern_auth_only=True)
    cases = [
        (("alice", token()), Reason.BEARER_TOKEN),
        (("ALICE", token()), Reason.BEARER_TOKEN),
        (("alice", token(sub="bob")), Reason.TOKEN_FOR_ANOTHER_USER),
        (("bob", token()), Reason.TOKEN_FOR_ANOTHER_USER),
        (("alice", token(sub="x", email="alice")), Reason.BEARER_TOKEN),
        (("alice", token(aud="other")), Reason.INVALID_TOKEN),
        (("alice", token(iss="https://evil.example")), Reason.INVALID_TOKEN),
        (("alice", token(exp=10_000 - 60)), Reason.INVALID_TOKEN),
        (("alice", "Primary-Passw0rd"), Reason.INVALID_TOKEN),  # a password is no token
        (("nobody", token(sub="nobody")), Reason.UNKNOWN_USER),
        (("gone", token(sub="gone")), Reason.ACCOUNT_INACTIVE),
        # OAuth is modern authentication: the modern-only group may use it.
        (("mo", token(sub="mo")), Reason.BEARER_TOKEN),
        (("alice", token(), "on-premises"), Reason.INVALID_TOKEN),  # only cloud listeners take tokens
    ]
    for args, reason in cases:
        assert decide(core, *args).reason is reason, args


def test_a_large_token_like_entras_is_taken(core):
    large = token(groups=[f"group-{i:04d}" for i in range(300)])
    assert len(large) > 4096
    assert decide(core, "alice", large).reason is Reason.BEARER_TOKEN
    # A password that long is still malformed.
    assert decide(core, "alice", "x" * 2000, bearer=False).reason is Reason.MALFORMED


def test_blocking_legacy_authentication_does_not_block_oauth(core):
    core.auth.policy = PolicyConfig(block_legacy_auth=True)
    assert decide(core, "alice", token()).reason is Reason.BEARER_TOKEN


def test_a_bad_token_never_asks_the_directory(core):
    asked = []
    resolve = core.directory.resolve

    async def counting(name):
        asked.append(name)
        return await resolve(name)

    core.directory.resolve = counting
    assert decide(core, "alice", token(aud="other")).reason is Reason.INVALID_TOKEN
    assert asked == []


def test_a_locked_account_is_refused_even_with_a_good_token(core):
    account = core.directory.add("carol", "Primary-Passw0rd")
    for _ in range(100):
        if core.auth.throttle.locked(account.key, "192.0.2.10"):
            break
        core.auth.throttle.failed(account.key, "192.0.2.10", f"guess{_}")
    assert core.auth.throttle.locked(account.key, "192.0.2.10")
    assert decide(core, "carol", token(sub="carol")).reason is Reason.LOCKED_OUT


def test_keys_out_of_reach_are_a_temporary_failure(core):
    core.auth.bearer.fetch_keys.down = True
    decision = decide(core, "alice", token())
    assert decision.reason is Reason.PROVIDER_UNAVAILABLE
    assert decision.outcome is Outcome.TEMPORARY_FAILURE


def test_without_the_oauth_section_no_listener_takes_tokens(core):
    core.auth.bearer = None
    assert not core.auth.takes_bearer_tokens("cloud")
    assert decide(core, "alice", token()).reason is Reason.INVALID_TOKEN


def test_oauthbearer_without_a_user_is_the_user_the_token_names(core):
    decision = decide(core, "", token())
    assert decision.reason is Reason.BEARER_TOKEN and decision.username == "alice"
    assert decide(core, "", token(sub=None)).reason is Reason.MALFORMED
    # Only tokens may leave the name out.
    assert decide(core, "", "Primary-Passw0rd", bearer=False).reason is Reason.MALFORMED


def test_a_token_for_a_name_with_no_account_waits_a_look_up_that_finds_one(core):
    """The directory found alice in 3 s, and finds no "nobody" at once: a
    good token naming nobody is refused when a look-up finding one would
    have ended, so that the time does not tell who has an account."""
    def attempt(username):
        return Attempt(protocol="imap", realm="cloud", username=username,
                       secret=token(sub=username), client_address="192.0.2.10", tls=True,
                       bearer=True)

    core.directory.lookup_gate = Deferred()
    alice = ensureDeferred(core.auth.authenticate(attempt("alice")))
    core.clock.advance(3)
    core.directory.lookup_gate.callback(None)
    core.directory.lookup_gate = None
    assert alice.result.accepted
    nobody = ensureDeferred(core.auth.authenticate(attempt("nobody")))
    core.clock.advance(2.9)
    assert not nobody.called
    core.clock.advance(0.2)
    assert nobody.result.reason is Reason.UNKNOWN_USER


def test_a_lockout_another_process_decided_refuses_a_good_token_here(core):
    from proxy.config import ThrottleConfig

    core.build(throttle=ThrottleConfig(source_delay=0, source_delay_max=0, account_failures=3,
                                       lockout=600), shared_failures=True)
    there = core.sibling()
    here = core.sibling()
    here.bearer = BearerTokens(clock=core.clock, fetch_keys=_keys, issuer=ISSUER,
                               audiences=("mail",), username_claims=("sub", "email"))
    core.directory.add("carol", "Primary-Passw0rd")
    for process in (here, there):
        ensureDeferred(process.start(poll_interval=1.0))
    for i in range(3):  # locked by failures counted by the other process
        ensureDeferred(there.authenticate(Attempt(
            protocol="imap", realm="cloud", username="carol", secret=f"guess{i}",
            client_address="192.0.2.10", tls=True)))
        core.clock.advance(60)
    d = ensureDeferred(here.authenticate(Attempt(
        protocol="imap", realm="cloud", username="carol", secret=token(sub="carol"),
        client_address="192.0.2.10", tls=True, bearer=True)))
    core.clock.advance(60)
    assert d.result.reason is Reason.LOCKED_OUT
    for process in (here, there):
        ensureDeferred(process.stop())


async def _keys():
    return KeySet([KEY]).as_dict(private=False)
