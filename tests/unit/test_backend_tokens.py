"""A backend login with backend_login: oauth2, its token from the cache: a
token the backend refuses as a token is forgotten, a new one asked for, and
the login tried once more, unseen by the client; other refusals are not
retried."""

import pytest
from twisted.internet import task
from twisted.internet.defer import ensureDeferred

from proxy.backends import BackendRefused, MasterLogin, TokenRefused
from proxy.backends.tokens import Grant, OAuthLogin, TokenCache, TokenUnavailable


class Connection:
    class transport:
        @staticmethod
        def abortConnection():
            pass


class Backend(MasterLogin):
    """Refuses the tokens in ``refused`` as tokens, and everything for ``nobody``."""

    refused: set = set()
    seen: list = []

    async def _prepared(self):
        return Connection()

    async def finish(self, connection, username, address, port, token=None):
        self.seen.append(token)
        if username == "nobody":
            raise BackendRefused("NO [AUTHENTICATIONFAILED] no such user")
        if token in self.refused:
            raise TokenRefused("NO [AUTHENTICATIONFAILED] (token: invalid_token)")


def make(answers):
    clock = task.Clock()
    issued = iter(answers)

    async def fetch(grant):
        answer = next(issued)
        if isinstance(answer, Exception):
            raise answer
        return answer, 3600.0

    cache = TokenCache(clock, fetch)
    oauth = OAuthLogin(cache, Grant("https://idp/token", "proxy", "s3cret"), "XOAUTH2")
    backend = Backend(reactor=clock, endpoint=None, starttls=None, master_user=None,
                      master_password="", login_style="oauth2", pass_client_address=False,
                      timeout=30, oauth=oauth)
    backend.refused, backend.seen = set(), []
    return clock, backend


def login(backend, user="alice"):
    d = ensureDeferred(backend._session(user, "192.0.2.1", 1234))
    assert d.called
    if hasattr(d.result, "value"):
        error = d.result.value
        d.addErrback(lambda f: None)
        raise error
    return d.result


def test_a_refused_token_is_renewed_and_the_login_tried_once_more():
    clock, backend = make(["t1", "t2"])
    login(backend)
    clock.advance(60)
    backend.refused = {"t1"}
    assert isinstance(login(backend), Connection)
    assert backend.seen == ["t1", "t1", "t2"]
    login(backend)
    assert backend.seen[-1] == "t2"  # kept


def test_twice_refused_is_the_backends_answer():
    clock, backend = make(["t1", "t2"])
    login(backend)
    clock.advance(60)
    backend.refused = {"t1", "t2"}
    with pytest.raises(TokenRefused):
        login(backend)
    assert backend.seen == ["t1", "t1", "t2"]


def test_a_backend_refusing_every_new_token_costs_no_request_a_login():
    clock, backend = make(["t1", "t2", "t3"])
    backend.refused = {"t1", "t2", "t3"}
    for _ in range(5):
        with pytest.raises(TokenRefused):
            login(backend)
    assert backend.seen == ["t1"] * 5  # t1 just obtained: kept, not asked for again


def test_a_refused_user_costs_no_new_token():
    _, backend = make(["t1"])
    with pytest.raises(BackendRefused):
        login(backend, "nobody")
    login(backend)
    assert backend.seen == ["t1", "t1"]


def test_no_token_no_login():
    _, backend = make([TokenUnavailable("token endpoint refused: 401 invalid_client")])
    with pytest.raises(TokenUnavailable, match="invalid_client"):
        login(backend)
    assert backend.seen == []
