"""Checking a primary password: by the directory, one bind on its bind pool.

A success may be kept in memory (``cache.primary_password_ttl``, off unless
the operator opts in), keyed by an HMAC of the DN and the secret under a key
that never leaves the process, with the password-change time it was checked
at: a change in the directory makes the entry worthless. A wrong secret the
directory refused is not sent to it again while it is among the last few
(a phone retrying a stale password must not lock its owner out there).
"""

from __future__ import annotations

import secrets
from typing import Any

from proxy.apppasswords import KeyedHash
from proxy.auth import Attempt, Decision, Reason
from proxy.auth.accounts import DirectoryLike
from proxy.auth.cache import SuccessCache
from proxy.auth.throttle import Throttle
from proxy.auth.timing import CheckTime
from proxy.config import CacheConfig
from proxy.directory import Account, DirectoryUnavailable


class PrimaryPasswords:
    def __init__(self, clock: Any, directory: DirectoryLike, throttle: Throttle,
                 cache: CacheConfig, check_time: CheckTime, metrics: Any = None) -> None:
        self._clock = clock
        self._directory = directory
        self._check_time = check_time
        self._throttle = throttle
        self.metrics = metrics
        self._successes: SuccessCache[float] = SuccessCache(
            clock.seconds, cache.primary_password_ttl, cache.max_entries)
        self._keyed = KeyedHash(secrets.token_bytes(32))

    def forget(self, username: str | None = None) -> None:
        if username is None:
            self._successes.clear()
        else:
            self._successes.drop_user(username)

    async def check(self, attempt: Attempt, account: Account, since: int) -> Decision:
        """The decision on ``attempt.secret`` as the account's primary
        password; failures and successes counted by the throttle (``since``:
        when the check began, in the throttle's order)."""
        key, address, secret = account.key, attempt.client_address, attempt.secret
        cache_key = self._keyed.digest(
            account.dn.encode() + b"\x00" + secret.encode("utf-8", "surrogateescape"))
        hit = self._successes.get(cache_key) == (account.password_changed_at or 0.0)
        if self.metrics is not None:
            self.metrics.cache("primary", hit)
        if hit:
            if not attempt.second_factor:
                self._throttle.succeeded(key, address, since)
            return Decision(Reason.PRIMARY, account.username, account)
        if self._throttle.recently_failed(key, address, secret):
            # The same wrong secret again: answered without asking the
            # directory, whose own lockout would otherwise count every retry.
            self._throttle.failed(key, address, secret)
            return Decision(Reason.WRONG_SECRET, account.username, account)
        if not account.dn:  # a name with no account: nothing to check
            self._throttle.failed(key, address, secret, upstream=True)
            return Decision(Reason.WRONG_SECRET, account.username, account)
        began = self._clock.seconds()
        try:
            accepted = await self._directory.check_password(account.dn, secret)
        except DirectoryUnavailable:
            return Decision(Reason.DIRECTORY_UNAVAILABLE, account.username, account)
        if not accepted:
            self._check_time.refused(self._clock.seconds() - began)
            self._throttle.failed(key, address, secret, upstream=True)
            return Decision(Reason.WRONG_SECRET, account.username, account, checked=True)
        self._successes.put(cache_key, account.password_changed_at or 0.0, user=account.username)
        if not attempt.second_factor:
            self._throttle.succeeded(key, address, since)
        return Decision(Reason.PRIMARY, account.username, account, checked=True)
