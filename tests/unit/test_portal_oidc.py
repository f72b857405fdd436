"""The portal's OpenID Connect checks with no provider: ID tokens signed
here with joserfc (Authlib's JOSE) and a local key, every rule one test."""

from __future__ import annotations

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey
from twisted.internet.task import Clock

from proxy.config import OidcConfig
from proxy.portal.oidc import (
    LEEWAY, PENDING_FOR, Pending, Pendings, Refused, check_id_token, digest, identity_of)

ISSUER = "https://idp.example.test"
CLIENT = "portal"
NOW = 1_800_000_000
KEY = RSAKey.generate_key(2048, parameters={"kid": "one"})
OTHER = RSAKey.generate_key(2048, parameters={"kid": "one"})  # same kid, another key
KEYS = KeySet([KEY])


def token(key=KEY, alg="RS256", **changes) -> str:
    claims = {"iss": ISSUER, "aud": CLIENT, "sub": "alice-sub", "exp": NOW + 300, "iat": NOW,
              "nonce": "n-1", "auth_time": NOW - 10, "preferred_username": "alice",
              "acr": "urn:loa:2", "amr": ["pwd", "otp"]}
    claims.update(changes)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode({"alg": alg, "kid": "one"}, claims, key)


def check(id_token: str, **overrides):
    arguments = dict(issuer=ISSUER, client_id=CLIENT, nonce="n-1", now=NOW)
    arguments.update(overrides)
    return check_id_token(id_token, KEYS, **arguments)


def refused(id_token: str, **overrides) -> str:
    with pytest.raises(Refused) as caught:
        check(id_token, **overrides)
    return caught.value.reason


def test_a_good_token_passes():
    assert check(token())["preferred_username"] == "alice"
    assert check(token(aud=[CLIENT, "other"], azp=CLIENT))["sub"] == "alice-sub"


@pytest.mark.parametrize("changes, reason", [
    ({"iss": "https://evil.example.test"}, "wrong_issuer"),
    ({"aud": "another-client"}, "wrong_audience"),
    ({"aud": [CLIENT, "other"]}, "wrong_audience"),  # several audiences and no azp
    ({"azp": "another-client"}, "wrong_audience"),
    ({"exp": NOW - LEEWAY - 1}, "expired"),
    ({"nonce": "n-2"}, "nonce_mismatch"),
    ({"nonce": None}, "missing_nonce"),
    ({"iat": NOW + LEEWAY + 60}, "not_yet_valid"),
])
def test_a_token_that_breaks_a_rule_is_refused(changes, reason):
    assert refused(token(**changes)) == reason


def test_a_signature_by_another_key_or_none_or_the_shared_secret_is_refused():
    assert refused(token(key=OTHER)) == "bad_signature"
    # HS256 keyed with something the client knows: never accepted.
    assert refused(token(key=OctKey.import_key("s" * 32), alg="HS256")) in ("malformed",
                                                                         "bad_signature")
    header, payload, _ = token().split(".")
    assert refused(f"{header}.{payload}.") in ("malformed", "bad_signature")
    assert refused("not a token") == "malformed"


def test_the_fresh_check_needs_a_recent_auth_time():
    assert check(token(auth_time=NOW - 200), max_age=300)
    assert refused(token(auth_time=NOW - 300 - LEEWAY - 1), max_age=300) == "not_fresh"
    assert refused(token(auth_time=None), max_age=300) == "missing_auth_time"
    assert check(token(auth_time=NOW - 86400))  # no max_age asked: a sign-in of any age


def config(**changes) -> OidcConfig:
    return OidcConfig(issuer=ISSUER, client_id=CLIENT, client_secret_file="/dev/null", **changes)


def test_the_name_and_what_counts_as_multi_factor():
    claims = check(token(preferred_username="alice@Example.COM"))
    assert identity_of(claims, config(), NOW).name == "alice@Example.COM"
    assert identity_of(claims, config(username_domain="example.com"), NOW).name == "alice"
    with pytest.raises(Refused, match="foreign_domain"):
        identity_of(claims, config(username_domain="example.org"), NOW)
    with pytest.raises(Refused, match="no_username"):
        identity_of(check(token(preferred_username=None)), config(), NOW)
    plain = check(token(acr="urn:loa:1", amr=["pwd"]))
    assert identity_of(plain, config(), NOW).multi_factor  # nothing configured: the provider's word
    with pytest.raises(Refused, match="not_multi_factor"):
        identity_of(plain, config(mfa_amr=("otp", "hwk")), NOW)
    assert identity_of(check(token()), config(mfa_amr=("otp",)), NOW).amr == ("pwd", "otp")
    assert identity_of(check(token()), config(mfa_acr=("urn:loa:2",)), NOW).acr == "urn:loa:2"
    # An auth_time ahead of our clock counts as now.
    assert identity_of(check(token(auth_time=NOW + 30)), config(), NOW).auth_time == NOW


def test_a_pending_sign_in_is_taken_once_by_its_own_browser_within_its_time():
    clock = Clock()
    pendings = Pendings(clock)

    def pending(state: str) -> Pending:
        return Pending(state=state, nonce="n", verifier="v", binding=digest("cookie-" + state),
                       purpose="sign_in", created=clock.seconds())

    pendings.add(pending("a"))
    assert pendings.take("a", "cookie-b") is None  # another browser's cookie
    assert pendings.take("a", "cookie-a") is None  # gone after any try
    pendings.add(pending("b"))
    assert pendings.take("b", "cookie-b").state == "b"
    pendings.add(pending("c"))
    clock.advance(PENDING_FOR)
    assert pendings.take("c", "cookie-c") is None
    pendings.add(pending("d"))
    assert len(pendings) == 1  # the expired one went when the next came
