"""Access tokens for backends that take only OAuth: obtained from the
identity provider's token endpoint with the client-credentials grant (the
organisation's app registration, as Exchange Online's ``IMAP.AccessAsApp``
works), kept until shortly before they expire, renewed ahead of time.

:class:`TokenCache` is the policy, with no I/O and the clock passed in: one
request in flight per key, a token renewed in the background once it is
near its end while logins go on with it, a provider that fails remembered
for a few seconds so that logins do not queue behind it. :class:`ClientCredentials`
is the request, over Twisted's HTTP client (never blocking the reactor).
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from proxy import webclient
from proxy.wire import oauth

log = Logger(namespace="legacy_auth_proxy.backends.tokens")

# How long before its end a token is renewed: at most this, at least a fifth
# of its lifetime (a five-minute token is renewed after four).
RENEW_AHEAD = 60.0
# A token with less than this left is not handed out: the backend checks it
# a moment later, with a clock that may be a little ahead.
MARGIN = 5.0
# After the provider failed, logins fail at once for this long instead of
# each waiting for it; then the next one asks again.
RETRY_AFTER = 5.0
# A token the backend refuses is dropped only once it is this old (or a
# fifth of its lifetime): one refused as soon as it came is the backend's
# doing, and asking again would not help.
KEEP_NEW = 30.0
MAX_BODY = 65536  # a token endpoint's answer; JWTs are a few kB


class TokenUnavailable(Exception):
    """No token: the provider is down or refused. ``reason`` is a few
    words for the audit log and the metric's label; never a secret."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class Token:
    value: str = attrs.field(repr=False)
    obtained: float
    expires: float

    @property
    def renew_at(self) -> float:
        lifetime = self.expires - self.obtained
        return self.expires - min(RENEW_AHEAD, lifetime / 5)

    def usable(self, now: float) -> bool:
        margin = min(MARGIN, (self.expires - self.obtained) / 10)
        return now < self.expires - margin


@attrs.define
class _Entry:
    token: Token | None = None
    asking: bool = False  # a request is in flight
    waiters: list[Deferred[Token]] = attrs.Factory(list)
    failed_at: float | None = None
    failure: str = ""


Fetch = Callable[[Hashable], Awaitable[tuple[str, float]]]


@attrs.define
class TokenCache:
    """Tokens by key. ``fetch(key)`` asks the provider and returns the
    token and its lifetime in seconds; ``on_failure(key, reason)`` is told
    each time it fails (a metric counts it)."""

    clock: Any  # IReactorTime
    fetch: Fetch
    on_failure: Callable[[Hashable, str], None] | None = None
    _entries: dict[Hashable, _Entry] = attrs.field(factory=dict, init=False)

    async def get(self, key: Hashable) -> str:
        """A token for ``key``: the cached one while usable (renewed in the
        background once near its end), else the answer of the one request
        in flight. Raises :class:`TokenUnavailable`."""
        now = self.clock.seconds()
        entry = self._entries.setdefault(key, _Entry())
        token = entry.token
        if token is not None and token.usable(now):
            if now >= token.renew_at and not entry.asking and not self._resting(entry, now):
                self._request(key, entry)
            return token.value
        if not entry.asking and self._resting(entry, now):
            raise TokenUnavailable(entry.failure)
        waiting: Deferred[Token] = Deferred()
        entry.waiters.append(waiting)
        if not entry.asking:
            self._request(key, entry)
        return (await waiting).value

    def forget(self, key: Hashable, value: str) -> None:
        """The backend refused ``value``: the next login asks for a new one
        (unless one is already newer). A token just obtained is kept: a
        backend that refuses every token (a key it does not know) must not
        turn each login into a request to the provider."""
        entry = self._entries.get(key)
        if entry is None or entry.token is None or entry.token.value != value:
            return
        token = entry.token
        if self.clock.seconds() - token.obtained >= min(KEEP_NEW, (token.expires - token.obtained) / 5):
            entry.token = None

    def _resting(self, entry: _Entry, now: float) -> bool:
        return entry.failed_at is not None and now - entry.failed_at < RETRY_AFTER

    def _request(self, key: Hashable, entry: _Entry) -> None:
        entry.asking = True
        Deferred.fromCoroutine(self._ask(key, entry))

    async def _ask(self, key: Hashable, entry: _Entry) -> None:
        started = self.clock.seconds()
        try:
            value, lifetime = await self.fetch(key)
        except Exception as e:
            reason = e.reason if isinstance(e, TokenUnavailable) else "token request failed"
            if not isinstance(e, TokenUnavailable):
                log.failure("asking for an access token failed unexpectedly")
            entry.asking = False
            entry.failed_at = self.clock.seconds()
            entry.failure = reason
            if self.on_failure is not None:
                self.on_failure(key, reason)
            waiters, entry.waiters = entry.waiters, []
            for waiting in waiters:
                if not waiting.called:  # a login that timed out cancelled its wait
                    waiting.errback(TokenUnavailable(reason))
            return
        # Its lifetime runs from when it was asked for, not from when it came.
        token = Token(value, started, started + max(0.0, lifetime))
        entry.asking = False
        entry.failed_at = None
        entry.failure = ""
        entry.token = token
        log.info("access token obtained for {key!r}, valid {lifetime:.0f} s", key=key, lifetime=lifetime)
        waiters, entry.waiters = entry.waiters, []
        for waiting in waiters:
            if not waiting.called:
                waiting.callback(token)


# -- the request --------------------------------------------------------------------------


@attrs.frozen
class Grant:
    """One app registration's client-credentials grant: the cache's key."""

    token_url: str
    client_id: str
    client_secret: str = attrs.field(repr=False)
    scope: str = ""
    # client_secret_basic (RFC 6749 2.3.1, what every provider takes) or
    # client_secret_post (the secret in the form: Entra's documented way).
    client_auth: str = "client_secret_basic"


def _form(fields: dict[str, str]) -> bytes:
    return urllib.parse.urlencode(fields).encode()


@attrs.define
class ClientCredentials:
    """Asks token endpoints for tokens: ``fetch`` for :class:`TokenCache`.
    ``agent`` is Twisted's ``twisted.web.client.Agent`` (or anything with
    its ``request``), trusting the provider's CA."""

    clock: Any
    agent: Any
    timeout: float = 10.0

    async def fetch(self, grant: Grant) -> tuple[str, float]:
        form = {"grant_type": "client_credentials"}
        if grant.scope:
            form["scope"] = grant.scope
        headers = {b"Content-Type": [b"application/x-www-form-urlencoded"],
                   b"Accept": [b"application/json"]}
        if grant.client_auth == "client_secret_post":
            form["client_id"] = grant.client_id
            form["client_secret"] = grant.client_secret
        else:
            # RFC 6749 2.3.1: each form-encoded, then joined by a colon.
            pair = (urllib.parse.quote(grant.client_id, safe="") + ":"
                    + urllib.parse.quote(grant.client_secret, safe=""))
            headers[b"Authorization"] = [b"Basic " + base64.b64encode(pair.encode())]
        try:
            code, body = await webclient.request(
                self.agent, self.clock, b"POST", grant.token_url, timeout=self.timeout,
                limit=MAX_BODY, headers=headers, body=_form(form))
        except webclient.AnswerTooLarge:
            raise TokenUnavailable("the token endpoint's answer is too large") from None
        except webclient.AnswerCut:
            raise TokenUnavailable("the token endpoint's answer was cut short") from None
        except Exception as e:
            # Refused, unreachable, TLS, timed out: the kind, never a URL
            # with credentials in it.
            raise TokenUnavailable(f"token endpoint unreachable: {type(e).__name__}") from None
        return self._read(code, body)

    @staticmethod
    def _read(code: int, body: bytes) -> tuple[str, float]:
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise TokenUnavailable(f"token endpoint answered {code} without JSON")
        if code != 200:
            error = answer.get("error")
            word = "".join(c for c in str(error)[:40] if c.isalnum() or c in "_-.") if error else ""
            raise TokenUnavailable(f"token endpoint refused: {code} {word}".rstrip())
        token = answer.get("access_token")
        kind = str(answer.get("token_type", "bearer")).lower()
        lifetime = answer.get("expires_in", 3600)
        if not isinstance(token, str) or not oauth.B64TOKEN.fullmatch(token) or kind != "bearer":
            raise TokenUnavailable("token endpoint answered without a bearer token")
        if isinstance(lifetime, str) and lifetime.isdigit():
            lifetime = int(lifetime)  # Entra's v1 endpoint says it as a string
        if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
            raise TokenUnavailable("token endpoint answered without a lifetime")
        return token, float(lifetime)


@attrs.define
class OAuthLogin:
    """What a backend needs to log in as the user with a token: the cache,
    the grant (its key), the SASL mechanism, and the server's name and
    port (OAUTHBEARER says them)."""

    cache: TokenCache
    grant: Grant
    mechanism: str = "XOAUTH2"  # or OAUTHBEARER
    host: str = ""
    port: int | None = None

    async def token(self) -> str:
        return await self.cache.get(self.grant)

    def forget(self, token: str) -> None:
        self.cache.forget(self.grant, token)

    def initial(self, username: str, token: str) -> bytes:
        """The first message as the user, base64."""
        return base64.b64encode(oauth.encode(self.mechanism, username, token, self.host, self.port))

    @property
    def dummy(self) -> bytes:
        """The answer to a refusal's challenge, base64 (possibly empty)."""
        return base64.b64encode(oauth.DUMMY[self.mechanism])


def refusal(challenge: bytes) -> str:
    """The status in a base64 refusal challenge, "" if none."""
    try:
        return oauth.error_status(base64.b64decode(challenge.strip(), validate=True))
    except ValueError:
        return ""


# The statuses that say the token itself was refused (RFC 7628's
# invalid_token; XOAUTH2 servers say 401, as Gmail does).
TOKEN_REFUSED = frozenset({"invalid_token", "401"})
