"""The access-token cache on task.Clock: expiry, renewal ahead of it, one
request in flight per key, a provider that fails and comes back; and the
token endpoint's answers read as RFC 6749 says."""

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred

from proxy.backends import tokens
from proxy.backends.tokens import ClientCredentials, TokenCache, TokenUnavailable


class Provider:
    """Answers each request when the test says so."""

    def __init__(self):
        self.asked = []  # (key, Deferred)
        self.issued = 0

    async def fetch(self, key):
        d = Deferred()
        self.asked.append((key, d))
        return await d

    def answer(self, lifetime=3600.0, index=-1):
        self.issued += 1
        self.asked[index][1].callback((f"token-{self.issued}", lifetime))

    def refuse(self, reason="token endpoint refused: 401 invalid_client", index=-1):
        self.asked[index][1].errback(TokenUnavailable(reason))


def setup():
    clock = task.Clock()
    clock.advance(1000)
    provider = Provider()
    failures = []
    cache = TokenCache(clock, provider.fetch, on_failure=lambda key, why: failures.append((key, why)))
    return clock, provider, cache, failures


def get(cache, key="k"):
    return ensureDeferred(cache.get(key))


def test_one_request_for_many_logins_then_the_cached_token():
    clock, provider, cache, _ = setup()
    logins = [get(cache) for _ in range(5)]
    assert len(provider.asked) == 1
    assert not any(d.called for d in logins)
    provider.answer()
    assert [d.result for d in logins] == ["token-1"] * 5
    clock.advance(3000)
    assert get(cache).result == "token-1"
    assert len(provider.asked) == 1


def test_keys_are_apart():
    clock, provider, cache, _ = setup()
    a, b = get(cache, "imap"), get(cache, "smtp")
    assert [k for k, _ in provider.asked] == ["imap", "smtp"]
    provider.answer(index=1)
    provider.answer(index=0)
    assert (a.result, b.result) == ("token-2", "token-1")


def test_renewed_ahead_of_its_end_while_logins_go_on_with_it():
    clock, provider, cache, _ = setup()
    first = get(cache)
    provider.answer(lifetime=3600)
    assert first.result == "token-1"
    clock.advance(3600 - tokens.RENEW_AHEAD - 1)
    assert get(cache).result == "token-1" and len(provider.asked) == 1
    clock.advance(2)  # within the last minute: renewed in the background
    assert get(cache).result == "token-1"
    assert len(provider.asked) == 2
    assert get(cache).result == "token-1" and len(provider.asked) == 2  # still one request
    provider.answer()
    assert get(cache).result == "token-2"


def test_a_short_token_is_renewed_after_four_fifths_of_its_life():
    clock, provider, cache, _ = setup()
    get(cache)
    provider.answer(lifetime=10)
    clock.advance(7.9)
    get(cache)
    assert len(provider.asked) == 1
    clock.advance(0.2)
    get(cache)
    assert len(provider.asked) == 2


def test_an_expired_token_is_never_handed_out():
    clock, provider, cache, _ = setup()
    get(cache)
    provider.answer(lifetime=3600)
    clock.advance(3600 - tokens.MARGIN)  # nobody logged in during its last minute
    waiting = get(cache)
    assert not waiting.called and len(provider.asked) == 2
    provider.answer()
    assert waiting.result == "token-2"


def test_the_lifetime_counts_from_the_request():
    clock, provider, cache, _ = setup()
    get(cache)
    clock.advance(30)  # a slow provider
    provider.answer(lifetime=100)
    clock.advance(100 - 30 - 1)
    d = get(cache)
    assert not d.called  # 1 s left by the provider's clock: less than the margin


def test_failure_then_recovery():
    clock, provider, cache, failures = setup()
    waiting = [get(cache), get(cache)]
    provider.refuse()
    for d in waiting:
        assert d.result.value.reason == "token endpoint refused: 401 invalid_client"
        d.addErrback(lambda f: None)
    assert failures == [("k", "token endpoint refused: 401 invalid_client")]
    # For a few seconds logins fail at once, without asking again.
    clock.advance(tokens.RETRY_AFTER - 1)
    d = get(cache)
    assert isinstance(d.result.value, TokenUnavailable)
    d.addErrback(lambda f: None)
    assert len(provider.asked) == 1
    clock.advance(1)
    d = get(cache)
    assert len(provider.asked) == 2
    provider.answer()
    assert d.result == "token-1"


def test_a_renewal_that_fails_keeps_the_old_token_until_its_end():
    clock, provider, cache, failures = setup()
    get(cache)
    provider.answer(lifetime=3600)
    clock.advance(3580)
    assert get(cache).result == "token-1"
    provider.refuse("token endpoint unreachable: ConnectionRefusedError")
    assert failures and get(cache).result == "token-1"
    assert len(provider.asked) == 2  # resting after the failure
    clock.advance(tokens.RETRY_AFTER)
    assert get(cache).result == "token-1"
    assert len(provider.asked) == 3
    provider.answer()
    assert get(cache).result == "token-2"


def test_a_refused_token_is_forgotten_and_asked_for_again():
    clock, provider, cache, _ = setup()
    get(cache)
    provider.answer()
    cache.forget("k", "token-other")  # not the cached one: kept
    assert get(cache).result == "token-1"
    cache.forget("k", "token-1")  # just obtained: kept
    assert get(cache).result == "token-1"
    clock.advance(tokens.KEEP_NEW)
    cache.forget("k", "token-1")
    d = get(cache)
    assert not d.called
    provider.answer()
    assert d.result == "token-2"


def test_a_login_that_gives_up_does_not_break_the_others():
    clock, provider, cache, _ = setup()
    impatient, patient = get(cache), get(cache)
    impatient.cancel()
    impatient.addErrback(lambda f: None)
    provider.answer()
    assert patient.result == "token-1"


# -- the token endpoint's answers ------------------------------------------------------


def test_a_good_answer():
    assert ClientCredentials._read(200, b'{"access_token":"eyJ.a-b_c","token_type":"Bearer",'
                                        b'"expires_in":3599}') == ("eyJ.a-b_c", 3599.0)
    # Entra's v1 endpoint says expires_in as a string.
    assert ClientCredentials._read(200, b'{"access_token":"t","token_type":"bearer",'
                                        b'"expires_in":"3599"}')[1] == 3599.0


@pytest.mark.parametrize("code, body, reason", [
    (401, b'{"error":"invalid_client","error_description":"secret s3cr3t wrong"}',
     "token endpoint refused: 401 invalid_client"),
    (400, b'{"error":"invalid_scope"}', "token endpoint refused: 400 invalid_scope"),
    (502, b"<html>bad gateway</html>", "token endpoint answered 502 without JSON"),
    (200, b'{"access_token":"t","token_type":"mac"}', "token endpoint answered without a bearer token"),
    (200, b'{"access_token":"a b","token_type":"bearer"}', "token endpoint answered without a bearer token"),
    (200, b'{"access_token":"t","expires_in":0}', "token endpoint answered without a lifetime"),
])
def test_refusals_and_odd_answers_say_why_without_the_body(code, body, reason):
    with pytest.raises(TokenUnavailable) as e:
        ClientCredentials._read(code, body)
    assert e.value.reason == reason
    assert "s3cr3t" not in str(e.value)


def test_the_grant_keeps_its_secret_out_of_its_repr():
    grant = tokens.Grant("https://idp/token", "proxy", "hunter2", "mail")
    assert "hunter2" not in repr(grant)


def test_a_body_is_read_whole_bounded_and_not_when_cut_short():
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseDone, ResponseFailed

    from proxy import webclient

    done = Deferred()
    body = webclient._Bounded(done, tokens.MAX_BODY, cut_short=False)
    body.dataReceived(b'{"a":')
    body.dataReceived(b"1}")
    body.connectionLost(Failure(ResponseDone()))
    assert done.result == b'{"a":1}'
    cut = Deferred()
    body = webclient._Bounded(cut, tokens.MAX_BODY, cut_short=False)
    body.dataReceived(b'{"a":')
    body.connectionLost(Failure(ResponseFailed([])))
    assert cut.result.check(webclient.AnswerCut)
    cut.addErrback(lambda f: None)
    large = Deferred()
    body = webclient._Bounded(large, tokens.MAX_BODY, cut_short=False)
    body.transport = None
    body.dataReceived(b"x" * (tokens.MAX_BODY + 1))
    body.connectionLost(Failure(ResponseDone()))
    assert large.result.check(webclient.AnswerTooLarge)
    large.addErrback(lambda f: None)
    glanced = Deferred()
    body = webclient._Bounded(glanced, 4, cut_short=True)
    body.transport = None
    body.dataReceived(b"x" * 10)
    body.connectionLost(Failure(ResponseDone()))
    assert glanced.result == b"xxxx"