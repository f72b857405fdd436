"""App-password and user administration: what the help desk and the operator do.

One place for the rules of creating and deleting app passwords, so that the
command line tool today and users' self-service later apply the same ones.
Synchronous and blocking (argon2, SQLite, the audit file): the command line
tool calls it directly; the daemon would call it on its pools.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Protocol

import attrs

from proxy import apppasswords
from proxy.config import PolicyConfig
from proxy.store import PROTOCOLS, AppPassword, MfaState, Store, User, check_networks


class Recorder(Protocol):
    def record(self, event: str, **fields: Any) -> Any: ...

    def close(self) -> None: ...


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
        audit: Recorder,
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

    def as_actor(self, actor: str) -> Admin:
        """The same Admin, recording its actions as done by ``actor``
        (``portal:NAME`` for the help desk and users themselves)."""
        other = copy.copy(self)
        other._actor = actor
        return other

    @staticmethod
    def username(name: str) -> str:
        problem = apppasswords.check_username(name)
        if problem:
            raise AdminError(problem)
        return apppasswords.canonical_username(name)

    def checked(
        self,
        username: str,
        name: str,
        *,
        expires_at: float | None = None,
        protocols: frozenset[str] | None = None,
        networks: tuple[str, ...] | None = None,
    ) -> tuple[str, tuple[str, ...] | None]:
        """Check what a new app password would be, with no I/O: the canonical
        user name and networks. Raises :class:`AdminError` saying what is wrong."""
        username = self.username(username)
        problem = apppasswords.check_name(name)
        if problem:
            raise AdminError(problem)
        if expires_at is not None and expires_at <= self._clock():
            raise AdminError("the expiry is in the past")
        if protocols is not None:
            unknown = protocols.difference(PROTOCOLS)
            if unknown or not protocols:
                raise AdminError(
                    f"protocols must be some of {', '.join(PROTOCOLS)}"
                    + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else "")
                )
        if networks is not None:
            try:
                networks = check_networks(networks)
            except ValueError as e:
                raise AdminError(str(e)) from None
        return username, networks

    def create(
        self,
        username: str,
        name: str,
        *,
        expires_at: float | None = None,
        protocols: frozenset[str] | None = None,
        networks: tuple[str, ...] | None = None,
        secret: str | None = None,
        password_hash: str | None = None,
    ) -> Created:
        """Generate an app password, store its lookup key and hash, and
        return the secret: the one and only time it exists outside a client.
        The daemon generates and hashes it in its argon2 pool first and
        passes ``secret`` and ``password_hash``, so that the store's thread
        never runs argon2."""
        username, networks = self.checked(username, name, expires_at=expires_at,
                                          protocols=protocols, networks=networks)
        if secret is None or password_hash is None:
            secret = apppasswords.generate()
            password_hash = self._hasher.hash(secret)
        record = self._store.create_app_password(
            username=username,
            name=name,
            lookup_key=apppasswords.lookup_key(self._pepper, username, secret),
            password_hash=password_hash,
            created_by=self._actor,
            now=self._clock(),
            expires_at=expires_at,
            protocols=protocols,
            limit=self._policy.max_app_passwords_per_user,
            networks=networks,
        )
        self._audit.record(
            "app_password_created",
            user=username,
            app_password_id=record.id,
            app_password_name=record.name,
            actor=self._actor,
            expires_at=expires_at,
            protocols=sorted(protocols) if protocols is not None else None,
            networks=list(networks) if networks is not None else None,
        )
        return Created(record, secret)

    def list(self, username: str) -> list[AppPassword]:
        """The user's app passwords, those that stopped working by themselves
        in the last 30 days included (``AppPassword.stopped`` says why)."""
        return self._store.list_app_passwords(self.username(username))

    def sweep(self) -> list[AppPassword]:
        """Mark app passwords that expired or went unused as stopped, and
        forget those stopped for 30 days (the daemon does it every hour)."""
        stopped = self._store.sweep(self._clock(), self._policy.app_password_idle_expiry)
        for record in stopped:
            self._audit.record(
                "app_password_stopped",
                user=record.username,
                app_password_id=record.id,
                app_password_name=record.name,
                reason=record.stopped_reason,
            )
        return stopped

    def unlock(self, username: str) -> None:
        """Lift the user's lockouts on every daemon (through the change feed)."""
        username = self.username(username)
        self._store.unlock(username, self._clock())
        self._audit.record("lockout_lifted", user=username, actor=self._actor)

    def has_second_factor(self, username: str) -> bool:
        return self._store.get_totp(self.username(username)) is not None

    def sealed_second_factor(self, username: str) -> bytes | None:
        """The user's TOTP key as stored (sealed), or None if not enrolled."""
        found = self._store.get_totp(self.username(username))
        return None if found is None else found[0]

    def take_second_factor_step(self, username: str, step: int) -> bool:
        """Use up a TOTP time step: False if it (or a later one) was used."""
        return self._store.use_totp_step(self.username(username), step)

    def enrol_second_factor(self, username: str, sealed: bytes, step: int) -> User:
        """Keep the user's confirmed TOTP key (sealed) and register them for
        MFA: state ``enforced``, as Entra moves a user once registration is done."""
        username = self.username(username)
        if not self._store.add_totp(username, sealed, step, self._clock()):
            raise AdminError(f"{username} has an authenticator app already; the help desk "
                             f"can reset it")
        self._audit.record("second_factor_enrolled", user=username, actor=self._actor,
                           method="totp")
        user = self.user(username)
        if user.mfa_state is MfaState.ENFORCED:
            return user
        return self.set_mfa(username, MfaState.ENFORCED)

    def reset_second_factor(self, username: str) -> bool:
        """A lost phone: the user enrols again at their next sign-in."""
        username = self.username(username)
        gone = self._store.delete_totp(username, self._clock())
        self._audit.record("second_factor_reset", user=username, actor=self._actor,
                           had_one=gone)
        return gone

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
