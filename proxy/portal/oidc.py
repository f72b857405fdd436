"""The portal's OpenID Connect client: signing in through the organisation's
identity provider (authorization code with PKCE, RFC 7636; state and nonce),
and the fresh check done there (``prompt=login`` with ``max_age``, the ID
token's ``auth_time`` checked).

Authlib builds the authorization and token requests and the PKCE challenge;
joserfc (Authlib's JOSE) checks the ID token's signature against the
provider's JWKS; :func:`check_id_token` holds every rule an ID token must
pass (OpenID Connect Core 3.1.3.7), as one pure function with the time
passed in. Discovery, keys and tokens are fetched with Twisted's HTTP
client: nothing here blocks the reactor. The discovery document and keys
are kept for an hour; a token signed with a key not among them fetches the
keys again, once (the provider rolled its keys).

What the provider says is a claim, not an account: the name it gives is
looked up in the directory by the sign-in pages, which stay the authority
on whether the account may sign in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import urllib.parse
from collections import OrderedDict
from typing import Any

import attrs
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError, ExpiredTokenError, InvalidClaimError, InvalidKeyIdError, InvalidTokenError,
    JoseError, MissingClaimError, MissingKeyError)
from joserfc.jwk import KeySet
from twisted.logger import Logger

from proxy import webclient
from proxy.config import OidcConfig

log = Logger(namespace="legacy_auth_proxy.portal.oidc")

MAX_BODY = 256 * 1024  # a discovery document, a JWKS or a token answer
KEPT_FOR = 3600.0  # discovery and keys, before they are fetched again
LEEWAY = 60  # seconds: the provider's clock against ours (exp, iat, auth_time)
PENDING_FOR = 600.0  # the longest a user may take at the provider
MAX_PENDING = 10_000  # sign-ins under way at once; the oldest go first
# Asymmetric signatures only: an HS256 token would be keyed by the client
# secret, which the portal shares with the provider, and "none" by nothing.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA"]


class ProviderError(Exception):
    """The provider could not be asked (down, refused the client, answered
    nonsense). The text is a few words for the log, never a secret."""


class Refused(Exception):
    """The ID token, or what it says, is not accepted. ``reason`` is one
    word for the audit log (wrong_issuer, wrong_audience, expired,
    nonce_mismatch, bad_signature, not_fresh, not_multi_factor, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class Provider:
    """What discovery said, and the keys it pointed to."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    keys: KeySet = attrs.field(repr=False)
    fetched: float


@attrs.frozen
class Pending:
    """A sign-in (or a fresh check) sent to the provider, until it comes
    back to the callback. ``binding`` is the digest of the random value in
    the browser's cookie: a callback from another browser finds no match."""

    state: str
    nonce: str = attrs.field(repr=False)
    verifier: str = attrs.field(repr=False)  # PKCE's code_verifier
    binding: bytes = attrs.field(repr=False)
    purpose: str  # "sign_in", or "fresh" (the signed-in user confirms it is them)
    created: float
    next: str = "/"
    username: str | None = None  # the fresh check's user
    session: bytes | None = attrs.field(default=None, repr=False)  # and their page session
    max_age: int | None = None


@attrs.frozen
class Identity:
    """Who the provider signed in, and how."""

    name: str  # what to look up in the directory
    subject: str
    auth_time: float
    acr: str | None
    amr: tuple[str, ...]
    multi_factor: bool


def digest(binding: str) -> bytes:
    return hashlib.sha256(binding.encode("utf-8", "replace")).digest()


class Pendings:
    """Sign-ins under way, by state, in memory; each is taken once, and
    only within PENDING_FOR."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._pending: OrderedDict[str, Pending] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, pending: Pending) -> None:
        self._pending[pending.state] = pending
        now = self._clock.seconds()
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if len(self._pending) <= MAX_PENDING and now - oldest.created < PENDING_FOR:
                break
            self._pending.popitem(last=False)

    def take(self, state: str, binding: str | None) -> Pending | None:
        """The sign-in ``state`` names, if this browser (``binding``, its
        cookie) began it and it is recent; it is gone afterwards either way."""
        pending = self._pending.pop(state, None) if state else None
        if pending is None or binding is None:
            return None
        if not secrets.compare_digest(pending.binding, digest(binding)):
            return None
        if self._clock.seconds() - pending.created >= PENDING_FOR:
            return None
        return pending


def check_id_token(id_token: str, keys: KeySet, *, issuer: str, client_id: str, nonce: str,
                   now: float, max_age: int | None = None) -> dict[str, Any]:
    """The claims of ``id_token`` once it passes every check OpenID Connect
    asks of a client (Core 3.1.3.7): signed by one of ``keys`` with an
    asymmetric algorithm; ``iss`` is ``issuer``; ``aud`` holds
    ``client_id`` (and ``azp`` names it when there are several); not
    expired, not issued in the future; ``nonce`` is the one sent; with
    ``max_age``, ``auth_time`` no older than that. Raises :class:`Refused`."""
    try:
        token = jwt.decode(id_token, keys, algorithms=ALGORITHMS)
    except (InvalidKeyIdError, MissingKeyError):
        raise Refused("unknown_key") from None  # a key the provider has rolled in since
    except (BadSignatureError, ValueError, JoseError) as e:
        raise Refused("bad_signature" if isinstance(e, BadSignatureError) else "malformed") from None
    claims = token.claims
    registry = jwt.JWTClaimsRegistry(
        now=int(now), leeway=LEEWAY,
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": client_id},
        sub={"essential": True},
        exp={"essential": True},
        iat={"essential": True},
        nonce={"essential": True, "value": nonce},
    )
    try:
        registry.validate(claims)
    except MissingClaimError as e:
        raise Refused(f"missing_{e.claim}" if hasattr(e, "claim") else "missing_claim") from None
    except ExpiredTokenError:
        raise Refused("expired") from None
    except InvalidClaimError as e:
        which = getattr(e, "claim", "")
        raise Refused({"iss": "wrong_issuer", "aud": "wrong_audience", "nonce": "nonce_mismatch",
                       "iat": "not_yet_valid", "nbf": "not_yet_valid"}.get(
                           which, f"invalid_{which or 'claim'}")) from None
    except InvalidTokenError:
        raise Refused("not_yet_valid") from None  # iat or nbf in the future
    except JoseError:
        raise Refused("malformed") from None
    audience = claims["aud"]
    if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != client_id:
        raise Refused("wrong_audience")
    if "azp" in claims and claims["azp"] != client_id:
        raise Refused("wrong_audience")
    if max_age is not None:
        auth_time = claims.get("auth_time")
        if type(auth_time) not in (int, float):
            raise Refused("missing_auth_time")
        if auth_time + max_age + LEEWAY < now:
            raise Refused("not_fresh")
    return claims


def identity_of(claims: dict[str, Any], config: OidcConfig, now: float) -> Identity:
    """The directory name and the kind of sign-in an accepted ID token
    says. Raises :class:`Refused` for a token with no usable name, or one
    that is not multi-factor when the config says what counts as that."""
    name = claims.get(config.username_claim)
    if not isinstance(name, str) or not name.strip():
        raise Refused("no_username")
    name = name.strip()
    if config.username_domain is not None:
        local, at, domain = name.rpartition("@")
        if not at or not local or domain.lower() != config.username_domain.lower():
            raise Refused("foreign_domain")
        name = local
    acr = claims.get("acr") if isinstance(claims.get("acr"), str) else None
    amr_claim = claims.get("amr")
    amr = tuple(a for a in amr_claim if isinstance(a, str)) if isinstance(amr_claim, list) else ()
    if config.mfa_acr or config.mfa_amr:
        multi_factor = acr in config.mfa_acr or any(a in config.mfa_amr for a in amr)
    else:
        multi_factor = True  # the provider enforces it (docs/configuration.md)
    if not multi_factor:
        raise Refused("not_multi_factor")
    auth_time = claims.get("auth_time")
    return Identity(name=name, subject=str(claims["sub"]),
                    auth_time=min(float(auth_time), now) if type(auth_time) in (int, float) else now,
                    acr=acr, amr=amr, multi_factor=multi_factor)


class OidcClient:
    """One provider, one client (the portal). ``agent`` is Twisted's
    ``Agent`` (built by :func:`proxy.webclient.agent`, trusting
    ``ca_file``); ``clock`` the reactor."""

    def __init__(self, clock: Any, config: OidcConfig, secret: str, agent: Any) -> None:
        self._clock = clock
        self.config = config
        self._secret = secret
        self._agent = agent
        self._provider: Provider | None = None
        self.pendings = Pendings(clock)

    # -- HTTP ------------------------------------------------------------------------

    async def _request(self, method: bytes, url: str, body: bytes | None = None,
                       headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, bytes]:
        try:
            return await webclient.request(
                self._agent, self._clock, method, url, timeout=self.config.timeout,
                limit=MAX_BODY, headers={b"Accept": [b"application/json"], **(headers or {})},
                body=body)
        except webclient.AnswerTooLarge:
            raise ProviderError("an answer larger than any the provider should send") from None
        except Exception as e:
            raise ProviderError(f"{url.split('?')[0]}: {type(e).__name__}") from None

    async def _json(self, url: str) -> dict[str, Any]:
        code, body = await self._request(b"GET", url)
        if code != 200:
            raise ProviderError(f"{url}: HTTP {code}")
        return _object(body, url)

    # -- discovery and keys ------------------------------------------------------------

    async def provider(self, refresh_keys: bool = False) -> Provider:
        """Discovery and keys, fetched when older than KEPT_FOR (or the keys
        again, with ``refresh_keys``). Raises :class:`ProviderError`."""
        now = self._clock.seconds()
        known = self._provider
        if known is not None and now - known.fetched < KEPT_FOR and not refresh_keys:
            return known
        if known is None or now - known.fetched >= KEPT_FOR:
            issuer = self.config.issuer.rstrip("/")
            found = await self._json(f"{issuer}/.well-known/openid-configuration")
            if found.get("issuer") != self.config.issuer:
                # OpenID Connect Discovery 4.3: the document must name the issuer asked for.
                raise ProviderError(f"the discovery document names the issuer "
                                    f"{str(found.get('issuer'))[:100]!r}, not {self.config.issuer!r}")
            try:
                endpoints = {k: _https(found[k], self.config.issuer)
                             for k in ("authorization_endpoint", "token_endpoint", "jwks_uri")}
            except KeyError as e:
                raise ProviderError(f"the discovery document names no {e.args[0]}") from None
        else:
            endpoints = {"authorization_endpoint": known.authorization_endpoint,
                         "token_endpoint": known.token_endpoint, "jwks_uri": known.jwks_uri}
        try:
            keys = KeySet.import_key_set(await self._json(endpoints["jwks_uri"]))  # type: ignore[arg-type]
        except ProviderError:
            raise
        except Exception:
            raise ProviderError("the provider's JWKS holds no usable keys") from None
        self._provider = Provider(issuer=self.config.issuer, keys=keys, fetched=now, **endpoints)
        return self._provider

    # -- the two legs --------------------------------------------------------------------

    async def begin(self, redirect_uri: str, binding: str, *, purpose: str = "sign_in",
                    next: str = "/", username: str | None = None,
                    session: bytes | None = None, max_age: int | None = None) -> str:
        """The URL to send the browser to; the sign-in is kept until the
        callback. A fresh check (``max_age``) asks for a new sign-in
        (``prompt=login``) no older than ``max_age``."""
        provider = await self.provider()
        verifier = generate_token(64)
        pending = Pending(state=generate_token(32), nonce=generate_token(32), verifier=verifier,
                          binding=digest(binding), purpose=purpose, created=self._clock.seconds(),
                          next=next, username=username, session=session, max_age=max_age)
        extra: dict[str, Any] = {"nonce": pending.nonce,
                                 "code_challenge": create_s256_code_challenge(verifier),
                                 "code_challenge_method": "S256"}
        if self.config.acr_values:
            extra["acr_values"] = self.config.acr_values
        if max_age is not None:
            extra["prompt"] = "login"
            extra["max_age"] = str(max_age)
        self.pendings.add(pending)
        return prepare_grant_uri(provider.authorization_endpoint, self.config.client_id, "code",
                                 redirect_uri, self.config.scope, pending.state, **extra)

    async def finish(self, pending: Pending, code: str, redirect_uri: str) -> Identity:
        """The code exchanged for tokens, the ID token checked, and who it
        names. Raises :class:`ProviderError` or :class:`Refused`."""
        provider = await self.provider()
        body = prepare_token_request("authorization_code", code=code, redirect_uri=redirect_uri,
                                     code_verifier=pending.verifier)
        credentials = _basic(self.config.client_id, self._secret)
        status, answer = await self._request(
            b"POST", provider.token_endpoint, body.encode(),
            {b"Content-Type": [b"application/x-www-form-urlencoded"],
             b"Authorization": [credentials]})
        if status != 200:
            error = _object(answer, "the token endpoint").get("error") if answer else None
            raise Refused(f"token_{str(error)[:40]}" if isinstance(error, str) else "token_refused")
        id_token = _object(answer, "the token endpoint").get("id_token")
        if not isinstance(id_token, str):
            raise Refused("no_id_token")
        now = self._clock.seconds()
        check = dict(issuer=self.config.issuer, client_id=self.config.client_id,
                     nonce=pending.nonce, now=now, max_age=pending.max_age)
        try:
            claims = check_id_token(id_token, provider.keys, **check)
        except Refused as e:
            if e.reason not in ("bad_signature", "unknown_key"):
                raise
            # Signed with a key we have not seen: the provider may have
            # rolled its keys since we fetched them. Once.
            provider = await self.provider(refresh_keys=True)
            claims = check_id_token(id_token, provider.keys, **check)
        return identity_of(claims, self.config, now)


def _basic(client_id: str, secret: str) -> bytes:
    """client_secret_basic (RFC 6749 2.3.1): each part form-encoded first."""
    pair = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(secret, safe='')}"
    return b"Basic " + base64.b64encode(pair.encode())


def _object(body: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        raise ProviderError(f"{where}: not JSON") from None
    if not isinstance(value, dict):
        raise ProviderError(f"{where}: not a JSON object")
    return value


def _https(url: Any, issuer: str) -> str:
    """An endpoint from discovery: https, or http only where the issuer is
    http itself (a loopback provider, as the config allows)."""
    if not isinstance(url, str) or not (url.startswith("https://") or (
            url.startswith("http://") and issuer.startswith("http://"))):
        raise ProviderError(f"the discovery document names an endpoint that is not https: "
                            f"{str(url)[:100]!r}")
    return url
