"""App-password and user administration: what the help desk and the operator do.

One place for the rules of creating and deleting app passwords, so that the
command line tool today and users' self-service later apply the same ones.
Synchronous and blocking (argon2, SQLite, the audit file): the command line
tool calls it directly; the daemon would call it on its pools.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from proxy import apppasswords
from proxy.audit import AuditLog
from proxy.config import PolicyConfig
from proxy.store import PROTOCOLS, AppPassword, MfaState, Store, User


class AdminError(Exception):
    """A request that cannot be carried out; the text says why and what to do."""


@attrs.frozen
class Created:
    record: AppPassword
    secret: str = attrs.field(repr=False)


class Admin:
    def __init__(
        self,
        *,
        store: Store,
        hasher: apppasswords.Hasher,
        pepper: bytes,
        audit: AuditLog,
        policy: PolicyConfig,
        clock: Callable[[], float],
        actor: str,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._pepper = pepper
        self._audit = audit
        self._policy = policy
        self._clock = clock
        self._actor = actor

    def close(self) -> None:
        self._store.close()
        self._audit.close()

    @staticmethod
    def username(name: str) -> str:
        problem = apppasswords.check_username(name)
        if problem:
            raise AdminError(problem)
        return apppasswords.canonical_username(name)

    def create(
        self,
        username: str,
        name: str,
        *,
        expires_at: float | None = None,
        protocols: frozenset[str] | None = None,
    ) -> Created:
        """Generate an app password, store its lookup key and hash, and
        return the secret: the one and only time it exists outside a client."""
        username = self.username(username)
        problem = apppasswords.check_name(name)
        if problem:
            raise AdminError(problem)
        now = self._clock()
        if expires_at is not None and expires_at <= now:
            raise AdminError("the expiry is in the past")
        if protocols is not None:
            unknown = protocols.difference(PROTOCOLS)
            if unknown or not protocols:
                raise AdminError(
                    f"protocols must be some of {', '.join(PROTOCOLS)}"
                    + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else "")
                )
        secret = apppasswords.generate()
        record = self._store.create_app_password(
            username=username,
            name=name,
            lookup_key=apppasswords.lookup_key(self._pepper, username, secret),
            password_hash=self._hasher.hash(secret),
            created_by=self._actor,
            now=now,
            expires_at=expires_at,
            protocols=protocols,
            limit=self._policy.max_app_passwords_per_user,
        )
        self._audit.record(
            "app_password_created",
            user=username,
            app_password_id=record.id,
            app_password_name=record.name,
            actor=self._actor,
            expires_at=expires_at,
            protocols=sorted(protocols) if protocols is not None else None,
        )
        return Created(record, secret)

    def list(self, username: str) -> list[AppPassword]:
        return self._store.list_app_passwords(self.username(username))

    def delete(self, username: str, id_or_name: str) -> AppPassword:
        username = self.username(username)
        found = self._store.find_app_password(username, id_or_name)
        deleted = found and self._store.delete_app_password(username, found.id, self._clock())
        if not deleted:
            raise AdminError(f"{username} has no app password with the id or name {id_or_name!r}")
        self._audit.record(
            "app_password_deleted",
            user=username,
            app_password_id=deleted.id,
            app_password_name=deleted.name,
            actor=self._actor,
        )
        return deleted

    def revoke_all(self, username: str) -> list[AppPassword]:
        """The help desk's "delete all existing app passwords"."""
        username = self.username(username)
        deleted = self._store.revoke_all(username, self._clock())
        self._audit.record(
            "app_passwords_revoked",
            user=username,
            count=len(deleted),
            app_password_ids=[a.id for a in deleted],
            actor=self._actor,
        )
        return deleted

    def user(self, username: str) -> User:
        return self._store.get_user(self.username(username))

    def set_mfa(self, username: str, state: MfaState) -> User:
        before = self.user(username)
        registered = before.mfa_registered_at
        if state is MfaState.DISABLED:
            registered = None
        elif state is MfaState.ENFORCED and registered is None:
            registered = self._clock()
        after = self._store.set_user(
            attrs.evolve(before, mfa_state=state, mfa_registered_at=registered), self._clock()
        )
        self._audit.record(
            "mfa_state_changed",
            user=after.username,
            previous=before.mfa_state.value,
            state=after.mfa_state.value,
            actor=self._actor,
        )
        return after

    def enroll(self, username: str, name: str) -> tuple[User, Created]:
        """Register the user for MFA (state ``enforced``, as Entra moves a user
        once registration is done) and issue the first app password."""
        created = self.create(username, name)
        return self.set_mfa(username, MfaState.ENFORCED), created
