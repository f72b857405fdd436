"""Failures counted by every process sharing the store (a fleet, or several
processes on one host), so that each locks an account alike.

Kept there by the user's store name, with two bytes of the secret's keyed
digest: enough to tell a repeat from a new guess among a handful, too little
to test guesses against (docs/deployment.md). Names that match no account
are counted by each process alone. A check is counted in the store before
it is made (:meth:`Fleet.reserve`), so guesses spread over every process
meet one budget; lockouts decided there reach each process through the
change feed and are imposed on the account's counters at its next sign-in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from proxy.auth import Decision, Reason
from proxy.auth.cache import LRU
from proxy.auth.throttle import Reservation, Throttle
from proxy.config import ThrottleConfig
from proxy.directory import Account
from proxy.store import Reserved, StoreError
from proxy.threads import Busy

log = Logger(namespace="legacy_auth_proxy.auth")

MAX_USERS = 100_000


class SharedCheck:
    """A check counted in the store too (:meth:`Fleet.checked`), until it
    is settled."""

    __slots__ = ("fleet", "counted", "own")

    def __init__(self, fleet: Fleet, counted: tuple[str, bool, bytes], own: bool) -> None:
        self.fleet = fleet
        self.counted = counted
        self.own = own  # its row is its own (NEW), not an earlier failure's

    def settle(self, decision: Decision | None) -> None:
        """The check is over: its own row stays only as the failure of a
        wrong secret checked. One answered from memory (one of the place's
        last refused, a phone's stale password) is not counted again in
        memory, nor here, where the window may have let its first go."""
        if self.own and (decision is None or decision.reason is not Reason.WRONG_SECRET
                         or not decision.checked):
            self.fleet.release(*self.counted)


class Fleet:
    def __init__(self, clock: Any, store: Any, throttle: Throttle, config: ThrottleConfig,
                 username_of: Callable[[str], str | None]) -> None:
        self._clock = clock
        self._store = store
        self._throttle = throttle
        self._config = config
        self._username_of = username_of
        # Lockouts decided by failures counted in the store, by user.
        self._lockouts: LRU[str, dict[bool, float]] = LRU(MAX_USERS)
        self._unlocks: dict[str, int] = {}  # unlocks seen, by user: a late read loses to one
        throttle.on_failure = self.failed
        throttle.on_forgiven = self.forgiven

    async def start(self) -> None:
        """Lockouts in force now: what the feed says from here on adds to them."""
        for username, lockouts in (await self._store.lockouts(self._clock.seconds())).items():
            self._lockouts.put(username, lockouts)

    def failed(self, key: str, familiar: bool, digest: bytes, now: float) -> None:
        """Count a failure in the store too (the throttle's ``on_failure``)."""
        username = self._username_of(key)
        if username is None:
            return
        config = self._config
        unlocks = self._unlocks.get(username, 0)
        d = self._store.add_failure(username, familiar, digest[:2], now,
                                    window=config.failure_window, limit=config.account_failures,
                                    lockout=config.lockout, lockout_max=config.lockout_max)

        def counted(until: float | None) -> None:
            if until is not None and self._unlocks.get(username, 0) == unlocks:
                # (A lockout the help desk lifted while the store answered
                # stays lifted: the feed's unlock came after it.)
                self._lockouts.obtain_or(username, {})[familiar] = until
                self._throttle.impose(key, familiar, until)

        def failed(failure: Any) -> None:
            if not failure.check(Busy):
                log.warn("cannot count a failure in the store: {error}",
                         error=failure.getErrorMessage())

        d.addCallbacks(counted, failed)

    def forgiven(self, key: str, digests: list[bytes], before: float) -> None:
        """A sign-in from a familiar place forgave the failures of
        ``digests`` this process counted there before ``before`` (the
        throttle's ``on_forgiven``): in the store too, or they would still
        count toward a lockout in every process."""
        username = self._username_of(key)
        if username is None:
            return
        self._store.forgive_failures(username, True, [d[:2] for d in digests], before,
                                     self._clock.seconds()).addErrback(
            lambda f: None if f.check(Busy) else log.warn(
                "cannot forgive failures in the store: {error}", error=f.getErrorMessage()))

    async def checked(self, username: str, reservation: Reservation) -> SharedCheck | None:
        """Count the check of ``reservation`` in the store too, so that
        guesses spread over every process sharing it meet one budget: None
        if, counted with theirs, it could pass the lockout (it must not be
        made)."""
        counted = (username, reservation.familiar, reservation.key[1])
        reserved = await self.reserve(*counted)
        return SharedCheck(self, counted, reserved is Reserved.NEW) if reserved else None

    async def reserve(self, username: str, familiar: bool, digest: bytes) -> Reserved:
        """The store's part of a reservation: REFUSED if, counted with every
        process's failures and checks, the check could pass the lockout;
        NEW if it counted the secret now (:meth:`release` it unless the
        secret was wrong). A store that cannot answer leaves the budget to
        this process alone (COUNTED: nothing to release)."""
        try:
            return await self._store.reserve_failure(
                username, familiar, digest[:2], self._clock.seconds(),
                window=self._config.failure_window, limit=self._config.account_failures)
        except (StoreError, Busy):
            return Reserved.COUNTED

    def release(self, username: str, familiar: bool, digest: bytes) -> None:
        """The secret a NEW reservation counted was not a wrong one: not a
        failure. (One counted before, by a failure or another check of it,
        is not this check's to take back.)"""
        self._store.release_failure(username, familiar, digest[:2]).addErrback(
            lambda f: log.warn("cannot release a check in the store: {error}",
                               error=f.getErrorMessage()))

    def locked_elsewhere(self, username: str) -> None:
        """The feed says the user was locked by failures counted in the store."""
        Deferred.fromCoroutine(self._read_lockouts(username))

    async def _read_lockouts(self, username: str) -> None:
        unlocks = self._unlocks.get(username, 0)
        try:
            lockouts = await self._store.lockouts(self._clock.seconds(), username)
        except Exception as e:
            log.warn("cannot read the lockouts of {user}: {error}", user=username, error=str(e))
            return
        if self._unlocks.get(username, 0) != unlocks:
            return  # unlocked while this was read
        if username in lockouts:
            self._lockouts.put(username, lockouts[username])
            log.info("{user} is locked out by failures counted in the shared store", user=username)

    def impose(self, account: Account) -> None:
        """Lockouts decided elsewhere, imposed on the account's counters."""
        lockouts = self._lockouts.peek(account.username)
        if lockouts is None:
            return
        now = self._clock.seconds()
        for familiar, until in lockouts.items():
            if until > now:
                self._throttle.impose(account.key, familiar, until)
        if all(until <= now for until in lockouts.values()):
            self._lockouts.pop(account.username)

    def locked_now(self) -> list[tuple[str, float]]:
        """The users the shared store says are locked out now (by failures
        counted on any process), and the seconds each stays locked."""
        now = self._clock.seconds()
        return [(username, longest - now) for username, lockouts in self._lockouts.items()
                if (longest := max(lockouts.values(), default=0.0)) > now]

    def unlocked(self, username: str) -> None:
        self._unlocks[username] = self._unlocks.get(username, 0) + 1
        self._lockouts.pop(username)
