"""The portal's OpenID Connect checks with no provider: ID tokens signed
here with joserfc (Authlib's JOSE) and a local key, every rule one test."""

from __future__ import annotations

import json
import urllib.parse

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from proxy.config import OidcConfig
from proxy.portal.oidc import (
    LEEWAY, PENDING_FOR, OidcClient, Pending, Pendings, ProviderError, Refused, check_id_token,
    digest, identity_of)

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
    assert refused(jwt.encode({"alg": "RS256", "kid": "new"}, {"iss": ISSUER}, OTHER)) == \
        "unknown_key"
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


# -- the client, over an agent in memory --------------------------------------------------


class FakeResponse:
    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self._body = body

    def deliverBody(self, protocol) -> None:
        protocol.dataReceived(self._body)
        protocol.connectionLost(None)


class FakeAgent:
    """Answers by URL from ``routes`` (a callable for the token endpoint);
    records what was asked."""

    def __init__(self, routes: dict) -> None:
        self.routes = routes
        self.asked: list[tuple[bytes, str, bytes]] = []

    def request(self, method, uri, headers=None, body=None):
        from twisted.internet.defer import succeed

        url = uri.decode()
        sent = body._inputFile.read() if body is not None else b""
        self.asked.append((method, url, sent))
        answer = self.routes.get(url)
        if callable(answer):
            answer = answer(sent, headers)
        if answer is None:
            return succeed(FakeResponse(404, b"{}"))
        code, value = answer
        return succeed(FakeResponse(code, value if isinstance(value, bytes) else
                                    json.dumps(value).encode()))


def discovery(**changes) -> dict:
    found = {"issuer": ISSUER, "authorization_endpoint": f"{ISSUER}/authorize",
             "token_endpoint": f"{ISSUER}/token", "jwks_uri": f"{ISSUER}/jwks"}
    found.update(changes)
    return found


def run(coroutine):
    from twisted.internet.defer import Deferred

    done = Deferred.fromCoroutine(coroutine)
    results = []
    done.addBoth(results.append)
    assert results, "the coroutine waited on something the fake agent never answers"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def client(routes: dict, clock=None, **changes):
    clock = clock or Clock()
    clock.advance(NOW)
    agent = FakeAgent(routes)
    return OidcClient(clock, config(**changes), "client-secret", agent), agent, clock


def routes_with(keys: list, token_answer) -> dict:
    return {f"{ISSUER}/.well-known/openid-configuration": (200, discovery()),
            f"{ISSUER}/jwks": (200, KeySet(keys).as_dict(private=False)),
            f"{ISSUER}/token": token_answer}


def test_a_whole_sign_in_with_the_provider_in_memory():
    pending_box = {}

    def token(sent, headers):
        fields = urllib.parse.parse_qs(sent.decode())
        assert fields["code_verifier"] == [pending_box["p"].verifier]
        assert headers.getRawHeaders(b"authorization")[0].startswith(b"Basic ")
        return 200, {"id_token": token_for(nonce=pending_box["p"].nonce), "access_token": "x"}

    oidc, agent, clock = client(routes_with([KEY], token))
    url = run(oidc.begin("https://portal.test/oidc/callback", "cookie-1"))
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and "prompt" not in query
    state = query["state"][0]
    pending_box["p"] = oidc.pendings.take(state, "cookie-1")
    identity = run(oidc.finish(pending_box["p"], "the-code", "https://portal.test/oidc/callback"))
    assert identity.name == "alice" and identity.amr == ("pwd", "otp")
    assert all(b"client-secret" not in sent for _, _, sent in agent.asked)  # in the header only
    # Discovery and keys are kept: a second sign-in fetches neither.
    before = len(agent.asked)
    again = run(oidc.begin("https://portal.test/oidc/callback", "cookie-2", purpose="fresh",
                           username="alice", max_age=300))
    assert len(agent.asked) == before
    # The fresh check asks for a new sign-in, no older than max_age.
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(again).query)
    assert query["prompt"] == ["login"] and query["max_age"] == ["300"]


def token_for(key=KEY, **changes) -> str:
    return token(key=key, **changes)


def test_keys_rolled_at_the_provider_are_fetched_again_once():
    new = RSAKey.generate_key(2048, parameters={"kid": "two"})
    served = {"keys": [KEY]}
    routes = routes_with([KEY], None)
    routes[f"{ISSUER}/jwks"] = lambda sent, headers: (200, KeySet(served["keys"]).as_dict(
        private=False))
    box = {}
    routes[f"{ISSUER}/token"] = lambda sent, headers: (
        200, {"id_token": jwt.encode({"alg": "RS256", "kid": "two"}, {
            "iss": ISSUER, "aud": CLIENT, "sub": "s", "exp": NOW + 60, "iat": NOW,
            "nonce": box["p"].nonce, "preferred_username": "alice"}, new)})
    oidc, agent, _ = client(routes)
    run(oidc.provider())
    served["keys"] = [KEY, new]  # the provider rolls its keys
    url = run(oidc.begin("https://portal.test/cb", "c"))
    box["p"] = oidc.pendings.take(urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
                                  ["state"][0], "c")
    assert run(oidc.finish(box["p"], "code", "https://portal.test/cb")).name == "alice"
    assert [u for _, u, _ in agent.asked].count(f"{ISSUER}/jwks") == 2


@pytest.mark.parametrize("found, words", [
    (discovery(issuer="https://evil.example.test"), "names the issuer"),
    (discovery(token_endpoint="http://idp.example.test/token"), "not https"),
    ({k: v for k, v in discovery().items() if k != "jwks_uri"}, "names no jwks_uri"),
])
def test_a_discovery_document_that_does_not_fit_is_refused(found, words):
    routes = routes_with([KEY], None)
    routes[f"{ISSUER}/.well-known/openid-configuration"] = (200, found)
    oidc, _, _ = client(routes)
    with pytest.raises(ProviderError, match=words):
        run(oidc.provider())


def test_a_refused_code_says_why_in_a_word_and_never_the_secret():
    oidc, _, _ = client(routes_with([KEY], (400, {"error": "invalid_grant"})))
    url = run(oidc.begin("https://portal.test/cb", "c"))
    pending = oidc.pendings.take(urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
                                 ["state"][0], "c")
    with pytest.raises(Refused) as caught:
        run(oidc.finish(pending, "code", "https://portal.test/cb"))
    assert caught.value.reason == "token_invalid_grant"
    assert "client-secret" not in repr(pending) + str(caught.value)
