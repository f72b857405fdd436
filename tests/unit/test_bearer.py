"""Access tokens clients sign in with, checked on task.Clock: signature,
issuer, audience, time, the user named, and the provider's keys fetched
once, again for an unknown key id at most once a minute, and a provider
that cannot be reached a temporary failure."""

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred

from proxy.auth import bearer
from proxy.auth.bearer import BearerTokens, InvalidToken, KeysUnavailable

ISSUER = "https://idp.example.test"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
OTHER = RSAKey.generate_key(2048, parameters={"kid": "k2"}, private=True)


def jwks(*keys):
    return KeySet(list(keys)).as_dict(private=False)


def token(key=KEY, **claims):
    now = 10_000
    body = {"iss": ISSUER, "aud": "mail-client", "sub": "alice", "exp": now + 600, "iat": now,
            **claims}
    return jwt.encode({"alg": "RS256", "kid": key.kid}, {k: v for k, v in body.items() if v is not None},
                      key)


class Provider:
    def __init__(self, *keys):
        self.document = jwks(*keys)
        self.fetches = 0
        self.down = False

    async def fetch(self):
        self.fetches += 1
        if self.down:
            raise ConnectionRefusedError("down")
        return self.document


def make(*keys):
    clock = task.Clock()
    clock.advance(10_000)
    provider = Provider(*(keys or (KEY,)))
    tokens = BearerTokens(clock=clock, fetch_keys=provider.fetch, issuer=ISSUER,
                          audiences=("mail-client",), username_claims=("sub",), leeway=30)
    return clock, provider, tokens


def verify(tokens, value):
    d = ensureDeferred(tokens.verify(value))
    assert d.called, "decided without waiting"
    if isinstance(d.result, Exception) or hasattr(d.result, "value"):
        failure = d.result
        d.addErrback(lambda f: None)
        raise failure.value
    return d.result


def test_a_good_token_names_its_user():
    _, provider, tokens = make()
    claims = verify(tokens, token())
    assert tokens.names(claims) == ["alice"]
    verify(tokens, token(aud=["other", "mail-client"]))
    assert provider.fetches == 1


@pytest.mark.parametrize("claims, why", [
    ({"iss": "https://evil.example"}, "another issuer"),
    ({"aud": "another-app"}, "another audience"),
    ({"aud": None}, "another audience"),
    ({"exp": None}, "no expiry"),
    ({"exp": 10_000 - 31}, "expired"),
    ({"nbf": 10_000 + 31}, "not yet valid"),
])
def test_refused_claims(claims, why):
    _, _, tokens = make()
    with pytest.raises(InvalidToken, match=why):
        verify(tokens, token(**claims))


def test_the_leeway_forgives_a_little_skew():
    _, _, tokens = make()
    verify(tokens, token(exp=10_000 - 29, nbf=10_000 + 29))


def test_a_token_signed_by_another_key_or_not_a_jwt_is_refused():
    _, _, tokens = make()
    forged = token(key=RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True))
    with pytest.raises(InvalidToken):
        verify(tokens, forged)
    for junk in ("", "abc", "a.b.c", "x" * 5000):
        with pytest.raises(InvalidToken):
            verify(tokens, junk)


def test_an_unsigned_token_is_refused():
    _, _, tokens = make()
    header = "eyJhbGciOiJub25lIn0"  # {"alg":"none"}
    good = token().split(".")
    with pytest.raises(InvalidToken):
        verify(tokens, f"{header}.{good[1]}.")


def test_expiry_follows_the_clock():
    clock, _, tokens = make()
    value = token()
    verify(tokens, value)
    clock.advance(600 + 30)
    with pytest.raises(InvalidToken, match="expired"):
        verify(tokens, value)


def test_rotated_keys_are_fetched_again_at_most_once_a_minute():
    clock, provider, tokens = make()
    verify(tokens, token())
    provider.document = jwks(KEY, OTHER)  # the provider rotates
    clock.advance(bearer.KEYS_MIN_INTERVAL)
    verify(tokens, token(key=OTHER))
    assert provider.fetches == 2
    # Made-up key ids do not make it fetch again within the minute.
    stranger = RSAKey.generate_key(2048, parameters={"kid": "k9"}, private=True)
    for _ in range(5):
        with pytest.raises(InvalidToken):
            verify(tokens, token(key=stranger))
    assert provider.fetches == 2


def test_keys_are_fetched_again_after_an_hour():
    clock, provider, tokens = make()
    verify(tokens, token())
    clock.advance(bearer.KEYS_MAX_AGE)
    verify(tokens, token(exp=10_000 + bearer.KEYS_MAX_AGE + 600))
    assert provider.fetches == 2


def test_a_provider_out_of_reach_is_a_temporary_failure_then_recovery():
    clock, provider, tokens = make()
    provider.down = True
    with pytest.raises(KeysUnavailable):
        verify(tokens, token())
    provider.down = False
    verify(tokens, token())


def test_known_keys_outlive_a_provider_that_went_away():
    clock, provider, tokens = make()
    verify(tokens, token())
    provider.down = True
    clock.advance(bearer.KEYS_MAX_AGE)
    verify(tokens, token(exp=10_000 + bearer.KEYS_MAX_AGE + 600))
    fetches = provider.fetches
    verify(tokens, token(exp=10_000 + bearer.KEYS_MAX_AGE + 600))
    assert provider.fetches == fetches  # not asked again at every sign-in


def test_one_fetch_for_many_sign_ins():
    clock = task.Clock()
    clock.advance(10_000)
    waiting = Deferred()
    fetches = []

    async def fetch():
        fetches.append(1)
        return await waiting

    tokens = BearerTokens(clock=clock, fetch_keys=fetch, issuer=ISSUER,
                          audiences=("mail-client",), username_claims=("sub",))
    checks = [ensureDeferred(tokens.verify(token())) for _ in range(3)]
    assert len(fetches) == 1 and not any(d.called for d in checks)
    waiting.callback(jwks(KEY))
    assert all(d.result["sub"] == "alice" for d in checks)
