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

import enum
from typing import Protocol

import attrs

from proxy import protocols

PROTOCOLS = tuple(sorted(protocols.NAMES))


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

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def allows(self, protocol: str) -> bool:
        return self.protocols is None or protocol in self.protocols


@attrs.frozen
class Change:
    """One entry of the store's change feed, which tells running daemons to
    drop cached results and close sessions (the command line tool and the
    daemon are separate processes)."""

    seq: int
    at: float
    username: str
    kind: str  # "deleted", "revoked_all", "state_changed"
    app_password_id: str | None


class StoreError(Exception):
    """A store operation that cannot be done as asked. Texts carry no secrets."""


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


class SchemaTooNew(StoreError):
    pass


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
    ) -> AppPassword: ...

    def list_app_passwords(self, username: str) -> list[AppPassword]: ...

    def has_app_passwords(self) -> bool: ...

    def find_app_password(self, username: str, id_or_name: str) -> AppPassword | None: ...

    def find_by_lookup_key(self, lookup_key: bytes) -> tuple[AppPassword, str] | None: ...

    def delete_app_password(self, username: str, id: str, now: float) -> AppPassword | None: ...

    def revoke_all(self, username: str, now: float) -> list[AppPassword]: ...

    def delete_created_before(self, username: str, when: float, now: float) -> list[AppPassword]: ...

    def record_use(self, id: str, at: float, address: str | None, protocol: str, count: int) -> None: ...

    def replace_hash(self, id: str, password_hash: str) -> None: ...

    def get_user(self, username: str) -> User: ...

    def set_user(self, user: User, now: float) -> User: ...

    def changes_since(self, seq: int) -> list[Change]: ...

    def last_change(self) -> int: ...

    def close(self) -> None: ...
