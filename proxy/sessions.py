"""Live sessions, so that what revokes a credential also ends its sessions.

Every front end registers a session once its client has signed in, and
removes it when the connection ends. The registry closes sessions when:

- their app password is deleted (by the command line tool or the daemon);
- all of the user's app passwords are revoked, or revoked by a primary
  password change (the user's app-password sessions);
- the account stops being active in the directory, is put in the
  modern-authentication-only group, or its primary password changes after
  the session's credential was made: accounts with live sessions are looked
  up again every ``directory.account_cache`` (at least every second), so
  this happens within that time even on connections that never sign in again;
- legacy authentication is blocked (``policy.block_legacy_auth`` switched on
  by a reload): every session.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from proxy.directory import STUCK_AFTER, DirectoryUnavailable

log = Logger(namespace="legacy_auth_proxy.sessions")


class Session(Protocol):
    username: str
    dn: str
    app_password_id: str | None  # None: signed in with the primary password
    app_password_created_at: float | None
    password_changed_at: float | None  # the account's, as the directory said at sign-in
    address: str  # the client's

    def revoke(self, reason: str) -> None:
        """End the session, telling the client in the protocol's own way."""


class Registry:
    """The live sessions, by user: what the authentication core counts (a
    device may hold only so many) and :class:`Sessions` ends. Built first
    and handed to both, so that neither is given the other after the fact."""

    def __init__(self) -> None:
        self.by_user: dict[str, set[Session]] = {}

    def count(self, username: str, address: str) -> int:
        """Sessions ``username`` holds from ``address``."""
        return sum(1 for s in self.by_user.get(username, ()) if s.address == address)


class Sessions:
    def __init__(
        self, clock: Any, directory: Any, check_interval: float, authenticator: Any = None,
        registry: Registry | None = None,
    ) -> None:
        self._clock = clock
        self._directory = directory
        self._authenticator = authenticator
        self.registry = registry if registry is not None else Registry()
        self._by_user = self.registry.by_user
        self._loop = LoopingCall(self.check_accounts)
        self._loop.clock = clock
        self._interval = max(check_interval, 1.0)
        self._checking = False
        # The directory times each of its steps; a look-up that still has no
        # answer after this long is given up, so that no call it never
        # answers stops the checks (LoopingCall waits for each round).
        timeout = getattr(getattr(directory, "config", None), "timeout", None)
        self._lookup_limit = STUCK_AFTER * timeout if timeout else 60.0

    def start(self) -> None:
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def still_valid(self, decision: Any) -> bool:
        """False if the decision's user had something revoked since: a session
        accepted before a revocation must not start after it."""
        return self._authenticator is None or not self._authenticator.revoked_since(decision)

    def add(self, session: Session) -> None:
        self._by_user.setdefault(session.username, set()).add(session)

    def remove(self, session: Session) -> None:
        sessions = self._by_user.get(session.username)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_user[session.username]

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_user.values())

    def of(self, username: str) -> list[Session]:
        return list(self._by_user.get(username, ()))

    def count(self, username: str, address: str) -> int:
        """Sessions ``username`` holds from ``address``."""
        return self.registry.count(username, address)

    def _end(self, sessions: Iterable[Session], reason: str) -> int:
        ended = 0
        for session in list(sessions):
            self.remove(session)
            try:
                session.revoke(reason)
            except Exception:
                log.failure("cannot end a session")
            ended += 1
        return ended

    def revoked(self, username: str, app_password_id: str | None, kind: str) -> None:
        """The Authenticator's revocation listener."""
        sessions = self.of(username)
        if kind == "deleted" and app_password_id is not None:
            chosen = [s for s in sessions if s.app_password_id == app_password_id]
        elif kind in ("revoked_all", "password_change"):
            chosen = [s for s in sessions if s.app_password_id is not None]
            if app_password_id is not None:
                chosen = [s for s in chosen if s.app_password_id == app_password_id]
        elif kind == "account_inactive":
            chosen = sessions
        else:
            return  # a change of MFA state leaves sessions already open alone
        if chosen:
            ended = self._end(chosen, kind)
            log.info("ended {count} session(s) of {user}: {kind}", count=ended, user=username, kind=kind)

    async def check_accounts(self) -> None:
        """Look up every account with live sessions; end those no longer
        valid. One account's trouble does not stop the others' checks."""
        if self._checking or self._directory is None:
            return
        self._checking = True
        try:
            for username in list(self._by_user):
                sessions = self.of(username)
                if not sessions:
                    continue
                lookup = defer.ensureDeferred(self._directory.resolve(sessions[0].dn))
                try:
                    account = await lookup.addTimeout(self._lookup_limit, self._clock)
                except (DirectoryUnavailable, defer.TimeoutError):
                    return  # keep serving; try again next round
                try:
                    await self._check(username, account)
                except Exception:
                    log.failure("cannot check the sessions of {user}", user=username)
        finally:
            self._checking = False

    async def _check(self, username: str, account: Any) -> None:
        if account is None or not account.active:
            ended = self._end(self.of(username), "account_inactive")
            log.info("ended {count} session(s) of {user}: the account is not active",
                     count=ended, user=username)
        elif account.modern_auth_only:
            ended = self._end(self.of(username), "legacy_blocked")
            log.info("ended {count} session(s) of {user}: legacy authentication is "
                     "blocked for them", count=ended, user=username)
        elif account.password_changed_at is not None:
            await self._password_changed(account)

    async def _password_changed(self, account: Any) -> None:
        """End the sessions opened before the primary password last changed
        (by the directory's own clock: the change time it reported when they
        signed in differs from today's), whether with the old password or
        an app password; and revoke the older app passwords."""
        stale = [s for s in self.of(account.username)
                 if s.password_changed_at != account.password_changed_at]
        if not stale:
            return
        if self._authenticator is not None and any(s.app_password_id for s in stale):
            await self._authenticator.password_changed(account)
        ended = self._end([s for s in stale if s in self.of(account.username)], "password_change")
        if ended:
            log.info("ended {count} session(s) of {user}: the primary password changed",
                     count=ended, user=account.username)

    def end_all(self, reason: str) -> int:
        """End every session (legacy authentication blocked), and any whose
        sign-in is being decided now."""
        if self._authenticator is not None:
            self._authenticator.revoke_everyone()
        ended = self._end([s for user in list(self._by_user) for s in self.of(user)], reason)
        if ended:
            log.info("ended {count} session(s): {reason}", count=ended, reason=reason)
        return ended
