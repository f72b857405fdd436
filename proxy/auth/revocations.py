"""Revocations: what ends what a decision vouched for.

Every revocation is counted; a decision carries the count it was made at,
and is not trusted once its user (or everyone) was revoked after it, or,
for a revocation of one app password (deleted, stopped), once that app
password was: a sign-in under way with the phone's app password goes on
when the laptop's is deleted, as the phone's open sessions do. The
listeners hear each one: the core's own caches first, then the session
registry, which ends the sessions it opened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from proxy.auth import Decision
from proxy.auth.cache import LRU
from proxy.directory import Account
from proxy.store import ChangeKind

log = Logger(namespace="legacy_auth_proxy.auth")

MAX_USERS = 100_000

Listener = Callable[[str, "str | None", ChangeKind], None]


class Revocations:
    def __init__(self, clock: Any, store: Any, record: Callable[..., None]) -> None:
        self._clock = clock
        self._store = store
        self._record = record
        self.revision = 0
        self._user_revision: LRU[str, int] = LRU(MAX_USERS)  # anything of the user's
        self._whole_user_revision: LRU[str, int] = LRU(MAX_USERS)  # all of the user's
        self._app_password_revision: LRU[str, int] = LRU(MAX_USERS)  # one app password
        self._everyone_revision = 0
        self._listeners: list[Listener] = []

    def on_revoked(self, listener: Listener) -> None:
        """Call ``listener(username, app_password_id or None, kind)`` when
        what a session was opened with stops being valid: ``deleted`` (one
        app password), ``revoked_all``, ``password_change`` (the user's app
        passwords), ``state_changed``, ``second_factor_reset`` or
        ``account_inactive`` (the user)."""
        self._listeners.append(listener)

    def of(self, username: str) -> int:
        """The count at the user's latest revocation, of whatever kind."""
        return self._user_revision.peek(username) or 0

    def revoked(self, username: str, id: str | None, kind: ChangeKind) -> None:
        """``id``: one app password stops (the rest of the user's stands);
        None: everything of the user's."""
        self.revision += 1
        self._user_revision.put(username, self.revision)
        if id is None:
            self._whole_user_revision.put(username, self.revision)
        else:
            self._app_password_revision.put(id, self.revision)
        for listener in self._listeners:
            try:
                listener(username, id, kind)
            except Exception:
                log.failure("a revocation listener failed")

    def revoke_everyone(self) -> None:
        self.revision += 1
        self._everyone_revision = self.revision

    def since(self, decision: Decision) -> bool:
        """Whether what the decision rests on was revoked after it was made:
        everyone's, its user's, or the app password it was made with."""
        revision = decision.revision
        if self._everyone_revision > revision \
                or (self._whole_user_revision.peek(decision.username) or 0) > revision:
            return True
        app_password = decision.app_password
        return app_password is not None \
            and (self._app_password_revision.peek(app_password.id) or 0) > revision

    async def stop_older(self, account: Account) -> None:
        """The account's app passwords made before its password last changed
        stop (in the store, with their reason), each one revoked, and audited."""
        assert account.password_changed_at is not None
        stopped = await self._store.stop_created_before(
            account.username, account.password_changed_at, self._clock.seconds())
        for record in stopped:
            self.revoked(account.username, record.id, ChangeKind.PASSWORD_CHANGE)
        if stopped:
            self._record("app_passwords_stopped", user=account.username, count=len(stopped),
                         app_password_ids=[r.id for r in stopped], reason="password_change",
                         actor="password_change")
