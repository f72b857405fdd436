"""Checking a secret against a user's app passwords.

One keyed-hash lookup key (never the secret) finds at most one candidate in
the store; one argon2id verify in the bounded hashing pool decides. A
success is cached by that key until the app password changes; a key the
store had nothing for is remembered for a minute (a device retrying a
deleted app password costs no store lookup). Verification cost does not grow
with the number of app passwords.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from proxy import apppasswords
from proxy.auth.cache import LRU, SuccessCache
from proxy.config import CacheConfig
from proxy.directory import Account
from proxy.store import AppPassword
from proxy.threads import Busy, Pool

log = Logger(namespace="legacy_auth_proxy.auth")

MISS_TTL = 60.0
MAX_MISSES = 50_000


class Found:
    """The store held the secret's app password, and argon2 says it is it."""

    def __init__(self, record: AppPassword, verified_now: bool) -> None:
        self.record = record
        self.verified_now = verified_now


BUSY = object()  # the hashing pool is full: a temporary failure


class AppPasswords:
    def __init__(self, clock: Any, store: Any, hash_pool: Pool, hasher: apppasswords.Hasher,
                 pepper: bytes, cache: CacheConfig, metrics: Any = None) -> None:
        self._clock = clock
        self._store = store
        self._hash_pool = hash_pool
        self._hasher = hasher
        self._pepper = pepper
        self.metrics = metrics
        self.successes: SuccessCache[AppPassword] = SuccessCache(
            clock.seconds, cache.app_password_ttl, cache.max_entries)
        # Lookup keys the store had no app password for → until when that is
        # trusted. A device with a deleted app password retries the same
        # secret for ever; a key missing now can only appear if the server
        # generates that very secret (2**-75) or a backup is restored, which
        # the time bounds.
        self._misses: LRU[bytes, float] = LRU(MAX_MISSES)
        self._miss_ttl = min(MISS_TTL, cache.app_password_ttl)
        self.argon2_runs = 0

    def key(self, username: str, secret: str) -> bytes:
        return apppasswords.lookup_key(self._pepper, username, secret)

    def cached(self, username: str, secret: str) -> AppPassword | None:
        """From the success cache only (the fast path)."""
        return self.successes.get(self.key(username, secret))

    async def find(self, account: Account, secret: str) -> Found | object | None:
        """The account's app password that ``secret`` is (:class:`Found`),
        None if none, or :data:`BUSY`. A name with no account (no DN) is
        looked up all the same, and never found."""
        key = self.key(account.username, secret)
        record = self.successes.get(key) if account.dn else None
        if self.metrics is not None:
            self.metrics.cache("app_password", record is not None)
        if record is not None:
            return Found(record, False)
        now = self._clock.seconds()
        until = self._misses.peek(key)
        if until is not None and now < until:
            return None
        found = await self._store.find_by_lookup_key(key)
        if found is None or found[0].username != account.username or not account.dn:
            if self._miss_ttl > 0:
                self._misses.put(key, now + self._miss_ttl)
            return None
        record, encoded = found
        try:
            verified = await self._hash_pool.submit(self._hasher.verify, encoded, secret)
        except Busy:
            return BUSY
        self.argon2_runs += 1
        if not verified:
            return None
        if self._hasher.needs_rehash(encoded):
            self._rehash(record, secret)
        return Found(record, True)

    def remember(self, account: Account, secret: str, record: AppPassword) -> None:
        self.successes.put(self.key(account.username, secret), record, user=account.username,
                           tag=record.id, expires_at=record.expires_at)

    def forget(self, username: str | None = None, id: str | None = None) -> None:
        """Drop cached successes: of one app password, of a user, or all
        (and the remembered misses with them)."""
        if id is not None:
            self.successes.drop_tag(id)
        elif username is not None:
            self.successes.drop_user(username)
        else:
            self.successes.clear()
            self._misses.clear()

    def _rehash(self, record: AppPassword, secret: str) -> None:
        """Outdated argon2 parameters: store a new hash, in the background."""

        async def rehash() -> None:
            try:
                encoded = await self._hash_pool.submit(self._hasher.hash, secret)
                await self._store.replace_hash(record.id, encoded)
                log.info("re-hashed app password {id} with new parameters", id=record.id)
            except Busy:
                pass  # next time
            except Exception:
                log.failure("cannot re-hash app password {id}", id=record.id)

        Deferred.fromCoroutine(rehash())
