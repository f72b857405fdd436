"""App-password and user administration: what the help desk and the operator do.

One place for the rules of creating and deleting app passwords, so that the
command line tool today and users' self-service later apply the same ones.
Synchronous and blocking (argon2, SQLite, the audit file): the command line
tool calls it directly; the daemon would call it on its pools.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs

from proxy import apppasswords
from proxy.config import PolicyConfig
from proxy.store import (
    API_SCOPES,
    PROTOCOLS,
    ApiToken,
    AppPassword,
    Conflict,
    MfaState,
    Passkey,
    PasskeyTaken,
    Store,
    StoreError,
    User,
    check_networks,
)

# An API token: a prefix that secret scanners can match, then 256 bits from
# the OS's CSPRNG. Only HMAC-SHA256(pepper, "api-token" NUL token) is stored,
# indexed: a token is checked on every call, and at 256 bits no guess is
# worth slowing down, so argon2 (which app passwords need) would only cost.
API_TOKEN_PREFIX = "lap_"
API_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
API_TOKEN_RATE = 600  # requests a minute, unless made with another
API_TOKEN_USE_EVERY = 60.0  # a token's last use is written at most this often


def api_token_key(pepper: bytes, token: str) -> bytes:
    return hmac.digest(pepper, b"api-token\x00" + token.encode("utf-8", "replace"),
                       hashlib.sha256)


class Recorder(Protocol):
    def record(self, event: str, **fields: Any) -> Any: ...

    def close(self) -> None: ...


class AdminError(Exception):
    """A request that cannot be carried out; the text says why and what to do."""


class NotFound(AdminError):
    """What was asked for does not exist (an app password, an API token)."""


@attrs.frozen
class Created:
    record: AppPassword
    secret: str = attrs.field(repr=False)


@attrs.frozen
class CreatedToken:
    record: ApiToken
    token: str = attrs.field(repr=False)


@attrs.frozen
class Page:
    """One page of app passwords: ``after`` is where the next one starts
    (an id), None at the end."""

    records: list[AppPassword]
    after: str | None


class _SecondFactors:
    """A user's second factors for the portal: the authenticator app (TOTP)
    and passkeys (WebAuthn), enrolled, used and reset, each change audited.
    Enrolling one registers the user for MFA (:meth:`Admin.set_mfa`), as
    Entra does once registration is done: part of :class:`Admin`."""

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

    # -- passkeys (the portal's WebAuthn second factor) ------------------------------

    def passkeys(self, username: str) -> list[Passkey]:
        return self._store.list_passkeys(self.username(username))

    def add_passkey(self, username: str, credential_id: bytes, name: str, credential: bytes,
                    sign_count: int) -> Passkey:
        """Keep a passkey the user just registered (its attestation checked);
        AdminError for a name they use already. Registers them for MFA, as
        an authenticator app does."""
        username = self.username(username)
        name = name.strip()
        if not 1 <= len(name) <= 64 or not name.isprintable():
            raise AdminError("a passkey's name is 1 to 64 printable characters")
        try:
            passkey = self._store.add_passkey(Passkey(credential_id, username, name, credential,
                                                      sign_count, self._clock()))
        except PasskeyTaken:
            raise AdminError(f"there is a passkey named {name} already") from None
        self._audit.record("second_factor_enrolled", user=username, actor=self._actor,
                           method="passkey", passkey=name)
        if self.user(username).mfa_state is not MfaState.ENFORCED:
            self.set_mfa(username, MfaState.ENFORCED)
        return passkey

    def remove_passkey(self, username: str, credential_id: bytes) -> Passkey | None:
        username = self.username(username)
        gone = self._store.delete_passkey(username, credential_id)
        if gone is not None:
            self._audit.record("passkey_removed", user=username, actor=self._actor,
                               passkey=gone.name)
        return gone

    def reset_passkeys(self, username: str) -> int:
        """The help desk forgets all of the user's passkeys (lost, or a
        colleague's registered): they sign in with their authenticator app."""
        username = self.username(username)
        gone = self._store.delete_passkeys(username, self._clock())
        self._audit.record("second_factor_reset", user=username, actor=self._actor,
                           method="passkey", had_one=gone > 0, count=gone)
        return gone

    def use_passkey(self, username: str, credential_id: bytes, sign_count: int) -> bool:
        """A sign-in with the passkey, its counter moved on: False for a
        counter that did not go up (a cloned authenticator), refused."""
        return self._store.use_passkey(self.username(username), credential_id, sign_count,
                                       self._clock())


class Admin(_SecondFactors):
    """The rules of every change to app passwords, users' MFA state, second
    factors (:class:`_SecondFactors`) and API tokens, each audited with its
    actor, whoever asks: the command line, the portal, the API."""

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

    def delete(self, username: str, id_or_name: str) -> AppPassword:
        username = self.username(username)
        found = self._store.find_app_password(username, id_or_name)
        deleted = found and self._store.delete_app_password(username, found.id, self._clock())
        if not deleted:
            raise NotFound(f"{username} has no app password with the id or name {id_or_name!r}")
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

    def set_mfa(self, username: str, state: MfaState, expected: User | None = None) -> User:
        """Set the user's MFA state; with ``expected`` (what the caller read:
        the API's If-Match), only if it is still that, else
        :class:`proxy.store.Conflict` and nothing changes."""
        before = self.user(username)
        if expected is not None and before != expected:
            raise Conflict(f"the state of {before.username} changed since it was read")
        registered = before.mfa_registered_at
        if state is MfaState.DISABLED:
            registered = None
        elif state is MfaState.ENFORCED and registered is None:
            registered = self._clock()
        after = self._store.set_user(
            attrs.evolve(before, mfa_state=state, mfa_registered_at=registered), self._clock(),
            expected=before if expected is not None else None,
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

    # -- every user's app passwords, and in bulk ------------------------------------

    def app_password(self, username: str, id: str) -> AppPassword:
        """The user's app password with this id (not a name: ids are what
        scripts hold). Raises :class:`NotFound`."""
        username = self.username(username)
        found = self._store.find_app_password(username, id)
        if found is None or found.id != id:
            raise NotFound(f"{username} has no app password with the id {id!r}")
        return found

    def app_passwords_page(
        self,
        *,
        after: str | None = None,
        limit: int = 100,
        username: str | None = None,
        stopped: bool | None = None,
        protocol: str | None = None,
        last_used_protocol: str | None = None,
        unused_for: float | None = None,
        scan: int = 5000,
    ) -> Page:
        """App passwords in the order of their ids (every user's, or one
        user's), after the id ``after``, those that pass every filter given:
        ``stopped`` (working or not, by :meth:`AppPassword.stopped`: the same
        rule as every listing), ``protocol`` (it may be used there),
        ``last_used_protocol``, ``unused_for`` (seconds without a use; never
        used counts from its creation). At most ``scan`` records are read for
        one page: a page may then be short, with ``after`` to go on from."""
        now = self._clock()
        idle = self._policy.app_password_idle_expiry

        def wanted(r: AppPassword) -> bool:
            if stopped is not None and (r.stopped(now, idle) is not None) != stopped:
                return False
            if protocol is not None and not r.allows(protocol):
                return False
            if last_used_protocol is not None and r.last_used_protocol != last_used_protocol:
                return False
            if unused_for is not None:
                last = r.last_used_at if r.last_used_at is not None else r.created_at
                if now - last < unused_for:
                    return False
            return True

        if username is not None:
            mine = sorted(self._store.list_app_passwords(self.username(username)),
                          key=lambda r: r.id)
            batches: Iterable[list[AppPassword]] = [[r for r in mine if r.id > (after or "")]]
        else:
            batches = self._batches(after, min(500, scan), scan)
        found: list[AppPassword] = []
        last = after
        for batch in batches:
            for record in batch:
                last = record.id
                if wanted(record):
                    found.append(record)
                    if len(found) == limit:
                        return Page(found, record.id)
        # Out of records (no next page), or at the scan's bound (go on from the last read).
        scanned_all = username is not None or last is None or not self._more_after(last)
        return Page(found, None if scanned_all else last)

    def _batches(self, after: str | None, size: int, scan: int) -> Iterable[list[AppPassword]]:
        read = 0
        while read < scan:
            batch = self._store.page_app_passwords(after, size)
            if not batch:
                return
            yield batch
            read += len(batch)
            after = batch[-1].id
            if len(batch) < size:
                return

    def _more_after(self, id: str) -> bool:
        return bool(self._store.page_app_passwords(id, 1))

    def delete_many(self, items: Iterable[tuple[str, str]]) -> list[AppPassword | AdminError]:
        """Delete each (user, id): what was deleted, or why not, item by item;
        each deletion is its own (audited) change."""
        results: list[AppPassword | AdminError] = []
        for username, id in items:
            try:
                self.app_password(username, id)  # by id only, never a name
                results.append(self.delete(username, id))
            except AdminError as e:
                results.append(e)
        return results

    def revoke_all_many(self, usernames: Iterable[str]) -> list[list[AppPassword] | AdminError]:
        """:meth:`revoke_all` for each user: what was deleted, or why not."""
        results: list[list[AppPassword] | AdminError] = []
        for username in usernames:
            try:
                results.append(self.revoke_all(username))
            except AdminError as e:
                results.append(e)
        return results

    # -- API tokens ----------------------------------------------------------------

    def create_api_token(self, name: str, scope: str, *, expires_at: float | None = None,
                         rate: int = API_TOKEN_RATE) -> CreatedToken:
        """Make an API token and return it: the one and only time it exists
        outside the caller. The store keeps its keyed hash."""
        if not API_TOKEN_NAME.fullmatch(name):
            raise AdminError("an API token's name is 1 to 64 letters, digits, dots, dashes and "
                             "underscores, starting with a letter or digit")
        if scope not in API_SCOPES:
            raise AdminError(f"the scope is one of {', '.join(API_SCOPES)}")
        if expires_at is not None and expires_at <= self._clock():
            raise AdminError("the expiry is in the past")
        if not 1 <= rate <= 100_000:
            raise AdminError("the rate is 1 to 100000 requests a minute")
        token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = self._store.create_api_token(
            name=name, lookup_key=api_token_key(self._pepper, token), scope=scope,
            created_by=self._actor, now=self._clock(), expires_at=expires_at, rate=rate)
        self._audit.record("api_token_created", api_token=name, scope=scope,
                           expires_at=expires_at, rate=rate, actor=self._actor)
        return CreatedToken(record, token)

    def api_tokens(self) -> list[ApiToken]:
        return self._store.list_api_tokens()

    def revoke_api_token(self, name: str) -> ApiToken:
        gone = self._store.revoke_api_token(name)
        if gone is None:
            raise NotFound(f"there is no API token named {name!r}")
        self._audit.record("api_token_revoked", api_token=name, actor=self._actor)
        return gone

    def api_token(self, token: str) -> ApiToken | None:
        """The API token presented, or None (unknown, revoked or expired).
        Its last use is written at most once a minute."""
        if not token.startswith(API_TOKEN_PREFIX) or len(token) > 128:
            return None
        found = self._store.find_api_token(api_token_key(self._pepper, token))
        now = self._clock()
        if found is None or found.expired(now):
            return None
        if found.last_used_at is None or now - found.last_used_at >= API_TOKEN_USE_EVERY:
            try:
                self._store.record_api_token_use(found.name, now)
            except StoreError:
                pass  # a last use is worth no refusal
        return found
