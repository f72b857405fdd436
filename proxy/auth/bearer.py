"""OAuth 2.0 access tokens that clients sign in with (SASL XOAUTH2 and
OAUTHBEARER, from Thunderbird and modern phones): JWTs, checked against the
identity provider's published keys (its JWKS, with joserfc, Authlib's JOSE),
its issuer, the audiences the proxy takes, their time, and the user they
name. No I/O here but ``fetch_keys``, passed in; the clock is passed in too.

The keys are fetched once, kept for an hour, and fetched again early when a
token names a key not among them (a provider that rotated its keys), at most
once a minute: a stream of tokens with made-up key ids cannot make the proxy
hammer the provider.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger(namespace="legacy_auth_proxy.auth.bearer")

KEYS_MAX_AGE = 3600.0
KEYS_MIN_INTERVAL = 60.0  # between fetches for an unknown key id
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


class InvalidToken(Exception):
    """The token is not good for this sign-in; ``reason`` says why in a
    few words (for the log; the audit says invalid_token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeysUnavailable(Exception):
    """The provider's keys could not be had: a temporary failure."""


@attrs.define
class BearerTokens:
    """Checks access tokens. ``fetch_keys()`` returns the JWKS document (a
    dict) or raises."""

    clock: Any
    fetch_keys: Callable[[], Awaitable[dict[str, Any]]]
    issuer: str
    audiences: tuple[str, ...]
    username_claims: tuple[str, ...] = ("preferred_username",)
    leeway: float = 30.0
    _keys: KeySet | None = attrs.field(default=None, init=False)
    _fetched_at: float = attrs.field(default=-1e18, init=False)
    _pending: list[Deferred[None]] | None = attrs.field(default=None, init=False)

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, if it is good now; raises InvalidToken or
        KeysUnavailable."""
        if token.count(".") != 2:
            raise InvalidToken("not a JWT")
        now = self.clock.seconds()
        if self._keys is None or now - self._fetched_at >= KEYS_MAX_AGE:
            await self._refresh()
        assert self._keys is not None
        try:
            decoded = jwt.decode(token, self._keys, algorithms=ALGORITHMS)
        except (JoseError, ValueError, KeyError, TypeError) as e:
            if not self._unknown_key(e) or self.clock.seconds() - self._fetched_at < KEYS_MIN_INTERVAL:
                raise InvalidToken(f"signature or form: {type(e).__name__}") from None
            await self._refresh()
            try:
                decoded = jwt.decode(token, self._keys, algorithms=ALGORITHMS)
            except (JoseError, ValueError, KeyError, TypeError) as e2:
                raise InvalidToken(f"signature or form: {type(e2).__name__}") from None
        return self.check_claims(decoded.claims, self.clock.seconds())

    @staticmethod
    def _unknown_key(e: Exception) -> bool:
        return "key" in str(e).lower() or isinstance(e, KeyError)

    def check_claims(self, claims: dict[str, Any], now: float) -> dict[str, Any]:
        if claims.get("iss") != self.issuer:
            raise InvalidToken("another issuer")
        audience = claims.get("aud")
        audiences = [audience] if isinstance(audience, str) else audience
        if not isinstance(audiences, list) or not set(map(str, audiences)) & set(self.audiences):
            raise InvalidToken("another audience")
        expires = claims.get("exp")
        if not isinstance(expires, (int, float)) or isinstance(expires, bool):
            raise InvalidToken("no expiry")
        if now >= expires + self.leeway:
            raise InvalidToken("expired")
        not_before = claims.get("nbf")
        if isinstance(not_before, (int, float)) and now + self.leeway < not_before:
            raise InvalidToken("not yet valid")
        return claims

    def names(self, claims: dict[str, Any]) -> list[str]:
        """The user names the token gives, in the configured claims."""
        return [str(claims[c]) for c in self.username_claims if isinstance(claims.get(c), str)]

    async def _refresh(self) -> None:
        """Fetch the keys; one fetch at a time, the others wait for it."""
        if self._pending is not None:
            waiting: Deferred[None] = Deferred()
            self._pending.append(waiting)
            await waiting
            if self._keys is None:
                raise KeysUnavailable("the provider's keys could not be fetched")
            return
        self._pending = []
        error: Exception | None = None
        try:
            document = await self.fetch_keys()
            self._keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
            self._fetched_at = self.clock.seconds()
        except Exception as e:
            error = e
            log.warn("cannot fetch the identity provider's keys: {error}",
                     error=str(e) or type(e).__name__)
            # Tried: not again for a minute, unless none are known at all.
            if self._keys is not None:
                self._fetched_at = self.clock.seconds() - KEYS_MAX_AGE + KEYS_MIN_INTERVAL
        waiting_list, self._pending = self._pending, None
        for d in waiting_list:
            d.callback(None)
        if error is not None and self._keys is None:
            raise KeysUnavailable("the provider's keys could not be fetched")
