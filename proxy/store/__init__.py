"""The app-password store: records, errors and the interface every backend keeps.

The store is the cloud side of the model: app passwords (as lookup keys and
argon2id hashes) and each user's MFA state. It never holds a primary password
or an app password's secret.

Backends are synchronous and do blocking I/O; the daemon reaches them only
through :class:`proxy.threads.Threaded`, which runs every call on the store's
own thread. SQLite is the default (:mod:`proxy.store.sqlite`); a shared
PostgreSQL store for several proxies would implement the same interface.
"""

from __future__ import annotations

import base64
import enum
import functools
import ipaddress
from typing import Any, Protocol

import attrs

from proxy import protocols
from proxy.wire import addresses

PROTOCOLS = tuple(sorted(protocols.NAMES))

# An app password that stopped working by itself (expired, stopped by a
# primary password change, unused too long) stays listed this long, with the
# reason, so that a user whose phone stopped syncing sees why; then it goes.
STOPPED_KEPT = 30 * 86400.0

# Why an app password stopped working by itself, in words for its owner.
STOPPED_REASONS = {
    "expired": "it expired",
    "password_change": "the account's password was changed after it was made",
    "unused": "it was not used for a long time",
}


@functools.lru_cache(maxsize=4096)
def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


def check_networks(texts: tuple[str, ...]) -> tuple[str, ...]:
    """Source networks in CIDR form, normalised; raises ValueError naming the bad one."""
    out = []
    for text in texts:
        try:
            out.append(str(_network(text.strip())))
        except ValueError:
            raise ValueError(f"not a network in CIDR form (192.0.2.0/24, 2001:db8::/32): {text!r}") from None
    if not out:
        raise ValueError("no network given")
    return tuple(dict.fromkeys(out))


def address_in(address: str, networks: tuple[str, ...]) -> bool:
    found = addresses.ip(address)
    return found is not None and any(found in _network(n) for n in networks)


class Reserved(enum.Enum):
    """What a check's reservation in the shared store came to
    (:meth:`Store.reserve_failure`)."""

    REFUSED = "refused"  # the check must not be made
    NEW = "new"  # counted now: released unless the secret turns out wrong
    COUNTED = "counted"  # the same guess was counted already: nothing of its own to release

    def __bool__(self) -> bool:  # whether the check may be made
        return self is not Reserved.REFUSED


class MfaState(enum.Enum):
    """Entra's per-user MFA states.

    - ``disabled``: not enrolled; primary passwords work on cloud listeners.
    - ``enabled``: enrolled but not yet registered; still signs in with the
      primary password until registration.
    - ``enforced``: registered; legacy clients must use app passwords on
      cloud listeners.
    """

    DISABLED = "disabled"
    ENABLED = "enabled"
    ENFORCED = "enforced"


@attrs.frozen
class User:
    username: str
    mfa_state: MfaState = MfaState.DISABLED
    mfa_registered_at: float | None = None


@attrs.frozen
class AppPassword:
    """An app password's metadata: everything but its lookup key and hash."""

    id: str
    username: str
    name: str
    created_at: float
    created_by: str
    expires_at: float | None = None
    protocols: frozenset[str] | None = None  # None: every protocol
    last_used_at: float | None = None
    last_used_address: str | None = None
    last_used_protocol: str | None = None
    use_count: int = 0
    networks: tuple[str, ...] | None = None  # CIDR; None: from anywhere
    stopped_at: float | None = None
    stopped_reason: str | None = None  # a key of STOPPED_REASONS

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def allows(self, protocol: str) -> bool:
        return self.protocols is None or protocol in self.protocols

    def allows_from(self, address: str) -> bool:
        return self.networks is None or address_in(address, self.networks)

    def idle(self, now: float, idle_expiry: float | None) -> bool:
        """Unused for longer than ``idle_expiry`` (never used: since made)."""
        last = self.last_used_at if self.last_used_at is not None else self.created_at
        return bool(idle_expiry) and now - last >= idle_expiry  # type: ignore[operator]

    def stopped(self, now: float, idle_expiry: float | None = None) -> str | None:
        """Why it no longer works by itself (a key of STOPPED_REASONS), or None."""
        if self.stopped_reason is not None:
            return self.stopped_reason
        if self.expired(now):
            return "expired"
        if self.idle(now, idle_expiry):
            return "unused"
        return None

    def stopped_since(self, idle_expiry: float | None = None) -> float:
        """When it stopped working (call only if :meth:`stopped` says it did)."""
        if self.stopped_at is not None:
            return self.stopped_at
        if self.expires_at is not None:
            return self.expires_at
        last = self.last_used_at if self.last_used_at is not None else self.created_at
        return last + (idle_expiry or 0.0)


COLUMNS = (
    "id, username, name, created_at, created_by, expires_at, protocols, "
    "last_used_at, last_used_address, last_used_protocol, use_count, networks, "
    "stopped_at, stopped_reason"
)


def app_password_from(row: Any) -> AppPassword:
    """An app password from a row of :data:`COLUMNS` (a mapping by column name)."""
    protocols = row["protocols"]
    return AppPassword(
        id=row["id"],
        username=row["username"],
        name=row["name"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        expires_at=row["expires_at"],
        protocols=frozenset(protocols.split(",")) if protocols is not None else None,
        last_used_at=row["last_used_at"],
        last_used_address=row["last_used_address"],
        last_used_protocol=row["last_used_protocol"],
        use_count=row["use_count"],
        networks=tuple(row["networks"].split(",")) if row["networks"] is not None else None,
        stopped_at=row["stopped_at"],
        stopped_reason=row["stopped_reason"],
    )


# What an API token may do: read (GET only), manage (app passwords too),
# helpdesk (users' state too). See docs/api.md.
API_SCOPES = ("read", "manage", "helpdesk")


@attrs.frozen
class ApiToken:
    """An API token's metadata: everything but its lookup key. The token
    itself is shown once when made and never stored."""

    name: str
    scope: str  # one of API_SCOPES
    created_at: float
    created_by: str
    expires_at: float | None = None
    rate: int = 600  # requests a minute
    last_used_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


API_TOKEN_COLUMNS = "name, scope, created_at, created_by, expires_at, rate, last_used_at"


def api_token_from(row: Any) -> ApiToken:
    return ApiToken(name=row["name"], scope=row["scope"], created_at=row["created_at"],
                    created_by=row["created_by"], expires_at=row["expires_at"],
                    rate=row["rate"], last_used_at=row["last_used_at"])


@attrs.frozen
class Passkey:
    """One of a user's passkeys (WebAuthn credentials) for the portal."""

    credential_id: bytes
    username: str
    name: str
    credential: bytes = attrs.field(repr=False)  # WebAuthn attested credential data: its public key
    sign_count: int = 0
    created_at: float = 0.0
    last_used_at: float | None = None

    @property
    def id(self) -> str:
        """The credential id as a URL names it (base64url, no padding)."""
        return base64.urlsafe_b64encode(self.credential_id).rstrip(b"=").decode("ascii")


def passkey_from(row: Any) -> Passkey:
    return Passkey(bytes(row["credential_id"]), row["username"], row["name"],
                   bytes(row["credential"]), row["sign_count"], row["created_at"],
                   row["last_used_at"])


PASSKEY_COLUMNS = "credential_id, username, name, credential, sign_count, created_at, last_used_at"


class ChangeKind(enum.StrEnum):
    """What changed of a user: the change feed's kinds, and the revocations
    the authentication core decides itself (never in the feed)."""

    DELETED = "deleted"  # one app password (the change names it)
    STOPPED = "stopped"  # one app password stopped by itself (expiry, unused)
    REVOKED_ALL = "revoked_all"  # all of the user's app passwords
    STATE_CHANGED = "state_changed"  # the user's MFA state
    SECOND_FACTOR_RESET = "second_factor_reset"  # the portal's authenticator forgotten
    LOCKED = "locked"  # locked by failures counted in the store
    UNLOCKED = "unlocked"  # the help desk lifted the user's lockouts
    # decided by the core, from what the directory says
    PASSWORD_CHANGE = "password_change"  # app passwords older than the password stop
    ACCOUNT_INACTIVE = "account_inactive"  # disabled, locked or deleted in the directory


@attrs.frozen
class Change:
    """One entry of the store's change feed, which tells running daemons to
    drop cached results and close sessions (the command line tool and the
    daemon are separate processes)."""

    seq: int
    at: float
    username: str
    kind: ChangeKind
    app_password_id: str | None


@attrs.frozen
class OutboxEvent:
    """One event waiting in the outbox for one webhook: its JSON body as it
    will be sent, and where it stands. Events of one ``lane`` (a user; ""
    for events of no user) go to their webhook in the order of ``seq``."""

    seq: int
    webhook: str
    lane: str
    event: str
    body: str
    created_at: float
    attempts: int = 0


OUTBOX_COLUMNS = "seq, webhook, lane, event, body, created_at, attempts"


def outbox_event_from(row: Any) -> OutboxEvent:
    return OutboxEvent(seq=row["seq"], webhook=row["webhook"], lane=row["lane"],
                       event=row["event"], body=row["body"], created_at=row["created_at"],
                       attempts=row["attempts"])


@attrs.frozen
class OutboxStats:
    """A webhook's undelivered events: how many, and since when the oldest waits."""

    waiting: int
    oldest: float | None


def lockout_length(lockout: float, lockout_max: float, before: int) -> float:
    """The one lockout schedule: ``lockout`` the first time, doubling on
    each of the ``before`` lockouts that came before, up to ``lockout_max``.
    The throttle and both stores call it."""
    return min(lockout * 2 ** min(before, 30), lockout_max)


class StoreError(Exception):
    """A store operation that cannot be done as asked. Texts carry no secrets."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now (the connection refused or timed out,
    a name that does not resolve, a server starting, stopping or full):
    trying again later may work. Every other StoreError needs a person."""


class LimitReached(StoreError):
    def __init__(self, username: str, count: int, limit: int) -> None:
        self.username = username
        self.count = count
        self.limit = limit
        super().__init__(f"{username} has {count} app passwords; the limit is {limit}")


class NameTaken(StoreError):
    def __init__(self, username: str, name: str) -> None:
        self.username = username
        self.name = name
        super().__init__(f"{username} already has an app password named {name!r}")


class PasskeyTaken(StoreError):
    def __init__(self, username: str, name: str) -> None:
        self.username = username
        self.name = name
        super().__init__(f"{username} already has a passkey named {name!r}, or this passkey")


class TokenNameTaken(StoreError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"there is an API token named {name!r} already")


class Conflict(StoreError):
    """The record changed since the caller read it (an ``If-Match`` that no
    longer holds): nothing was changed."""


class SchemaTooNew(StoreError):
    pass


class SchemaOutdated(StoreError):
    """An older schema: ``legacy-auth-proxy migrate`` brings it up to date."""


class Store(Protocol):
    """What every store backend provides. All methods block."""

    def create_app_password(
        self,
        *,
        username: str,
        name: str,
        lookup_key: bytes,
        password_hash: str,
        created_by: str,
        now: float,
        expires_at: float | None,
        protocols: frozenset[str] | None,
        limit: int,
        networks: tuple[str, ...] | None = None,
    ) -> AppPassword: ...

    def list_app_passwords(self, username: str) -> list[AppPassword]: ...

    def page_app_passwords(self, after: str | None, limit: int) -> list[AppPassword]:
        """Every user's app passwords in the order of their ids, the first
        ``limit`` after the id ``after``: a cursor that stays right while
        others are made and deleted."""
        ...

    def has_app_passwords(self) -> bool: ...

    def find_app_password(self, username: str, id_or_name: str) -> AppPassword | None: ...

    def find_by_lookup_key(self, lookup_key: bytes) -> tuple[AppPassword, str] | None: ...

    def delete_app_password(self, username: str, id: str, now: float) -> AppPassword | None: ...

    def revoke_all(self, username: str, now: float) -> list[AppPassword]: ...

    def stop_created_before(self, username: str, when: float, now: float) -> list[AppPassword]: ...

    def sweep(self, now: float, idle_expiry: float | None) -> list[AppPassword]: ...

    def record_use(self, id: str, at: float, address: str | None, protocol: str, count: int) -> None: ...

    def replace_hash(self, id: str, password_hash: str) -> None: ...

    def get_user(self, username: str) -> User: ...

    def set_user(self, user: User, now: float, expected: User | None = None) -> User:
        """Keep the user's state; with ``expected``, only if the stored state
        is still that (else :class:`Conflict`), in the same transaction."""
        ...

    def get_totp(self, username: str) -> tuple[bytes, int] | None: ...

    def add_totp(self, username: str, sealed: bytes, step: int, now: float) -> bool: ...

    def delete_totp(self, username: str, now: float) -> bool: ...

    def use_totp_step(self, username: str, step: int) -> bool: ...

    def add_passkey(self, passkey: Passkey) -> Passkey: ...

    def list_passkeys(self, username: str) -> list[Passkey]: ...

    def delete_passkey(self, username: str, credential_id: bytes) -> Passkey | None: ...

    def delete_passkeys(self, username: str, now: float) -> int: ...

    def use_passkey(self, username: str, credential_id: bytes, sign_count: int, now: float) -> bool:
        """Record a sign-in with the passkey: False (nothing changed) if its
        signature counter did not go up, a sign of a cloned authenticator
        (WebAuthn's clone check; a counter that stays 0 is an authenticator
        that keeps none, not a clone). One statement: two processes never
        both take the same counter value."""

    def note(self, username: str, kind: str, now: float) -> None: ...

    def add_failure(self, account: str, familiar: bool, digest: bytes, now: float, *,
                    window: float, limit: int, lockout: float,
                    lockout_max: float) -> float | None: ...

    def reserve_failure(self, account: str, familiar: bool, digest: bytes, now: float, *,
                        window: float, limit: int) -> Reserved: ...

    def release_failure(self, account: str, familiar: bool, digest: bytes) -> None: ...

    def forgive_failures(self, account: str, familiar: bool, digests: list[bytes], before: float,
                         now: float) -> None:
        """A sign-in worked from the place: the failures of ``digests``
        counted there before ``before`` go (those the signing-in process
        forgave; others' stay), and its lockouts' doubling starts over,
        unless a lockout is in force there (locked by guesses beside it)."""

    def lockouts(self, now: float, account: str | None = None) -> dict[str, dict[bool, float]]: ...

    def unlock(self, account: str, now: float) -> None: ...

    def changes_since(self, seq: int) -> list[Change]: ...

    def create_api_token(self, *, name: str, lookup_key: bytes, scope: str, created_by: str,
                         now: float, expires_at: float | None, rate: int) -> ApiToken: ...

    def list_api_tokens(self) -> list[ApiToken]: ...

    def find_api_token(self, lookup_key: bytes) -> ApiToken | None: ...

    def revoke_api_token(self, name: str) -> ApiToken | None: ...

    def record_api_token_use(self, name: str, at: float) -> None: ...

    def last_change(self) -> int: ...

    # -- the events' outbox (webhooks; docs/events.md) --

    def add_events(self, rows: list[tuple[str, str, str, str]], now: float) -> None:
        """Keep events for delivery, in one transaction: (webhook, lane,
        event, JSON body) each, in the order given, which is the order of
        their lane."""
        ...

    def claim_events(self, webhooks: tuple[str, ...], node: str, now: float, lease: float,
                     limit: int) -> list[OutboxEvent]:
        """Up to ``limit`` events due for ``webhooks``, each the first
        undelivered event of its lane, none claimed by another node whose
        lease still runs: claimed for ``node`` until ``now + lease``."""
        ...

    def settle_events(self, delivered: list[int], failed: list[tuple[int, float, str]],
                      now: float) -> None:
        """Mark events delivered (after a 2xx), or failed (seq, when to try
        again, why), and release their claims, in one transaction."""
        ...

    def forget_claims(self) -> None:
        """A store only one daemon delivers from (SQLite): release claims a
        daemon killed mid-delivery left. PostgreSQL: nothing (other nodes'
        claims are theirs until their lease ends)."""
        ...

    def outbox_stats(self) -> dict[str, OutboxStats]:
        """Undelivered events, by webhook."""
        ...

    def prune_events(self, delivered_before: float, give_up: dict[str, float],
                     default_give_up: float) -> tuple[int, int]:
        """Delete delivered events delivered before ``delivered_before``, and
        undelivered ones made before their webhook's ``give_up`` time
        (``default_give_up`` for webhooks no longer configured): how many of
        each."""
        ...

    def close(self) -> None: ...
