"""Lockouts as the help desk sees them: which users are locked out and for
how long, and lifting a user's lockouts. The counts are the throttle's, for
this process, and, with a shared store, the fleet's (:mod:`proxy.auth.fleet`),
for every process on it; the help desk names users, the counts are kept by
account (:meth:`proxy.auth.accounts.Accounts.keys_of`).
"""

from __future__ import annotations

from proxy.auth.accounts import Accounts
from proxy.auth.fleet import Fleet
from proxy.auth.throttle import Throttle
from proxy.directory import Account


class Lockouts:
    """The throttle's and the fleet's lockouts, by user. ``fleet``: None
    when failures are counted in this process alone."""

    def __init__(self, throttle: Throttle, accounts: Accounts, fleet: Fleet | None) -> None:
        self._throttle = throttle
        self._accounts = accounts
        self._fleet = fleet

    def unlock(self, username: str) -> int:
        """Lift every lockout of the account the store calls ``username``
        (the help desk's "lift a lockout"); how many accounts were found."""
        if self._fleet is not None:
            self._fleet.unlocked(username)
        keys = self._accounts.keys_of(username)
        for key in keys + ["unknown:" + username]:
            self._throttle.forget(key)
        return len(keys)

    def locked_elsewhere(self, username: str) -> None:
        """The store says ``username`` was locked by failures counted there,
        perhaps by another process."""
        if self._fleet is not None:
            self._fleet.locked_elsewhere(username)

    def locked_out(self) -> list[tuple[str, float]]:
        """The users locked out now and the seconds each stays locked,
        longest first (the help desk's list): this process's lockouts and,
        with a shared store, every process's."""
        found: dict[str, float] = {}
        for key, seconds in self._throttle.locked_accounts():
            name = self._accounts.username_of(key) or key
            found[name] = max(seconds, found.get(name, 0.0))
        if self._fleet is not None:
            for name, seconds in self._fleet.locked_now():
                found[name] = max(seconds, found.get(name, 0.0))
        return sorted(found.items(), key=lambda pair: -pair[1])

    def locked(self, account: Account, address: str | None = None) -> float:
        """Seconds the account stays locked (from ``address``, or anywhere:
        the longest), with the lockouts another process decided through the
        shared store imposed first, as a sign-in's check does."""
        if self._fleet is not None:
            self._fleet.impose(account)
        return self._throttle.locked_anywhere(account.key) if address is None \
            else self._throttle.locked(account.key, address)
