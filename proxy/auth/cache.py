"""In-memory caches of successful checks, keyed by HMACs, never by a secret.

Legacy clients sign in on every connection; a cached success spares the
argon2 run (app passwords) or the directory bind (primary passwords, only
when the operator opts in). Entries are dropped the moment what they vouch
for changes: the app password deleted or expired, all of a user's revoked,
the user's state changed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import attrs

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A dict that forgets its least recently used entries past ``limit``:
    the one bounded table of the core (accounts, users, misses, revisions,
    the throttle's counters)."""

    def __init__(self, limit: int, factory: Callable[[], V] | None = None) -> None:
        self._data: OrderedDict[K, V] = OrderedDict()
        self._limit = limit
        self._factory = factory

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None if absent."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The value, leaving the order alone."""
        return self._data.get(key)

    def obtain(self, key: K) -> V:
        """The value, made by the factory if absent."""
        value = self.get(key)
        if value is None:
            assert self._factory is not None
            value = self._factory()
            self.put(key, value)
        return value

    def obtain_or(self, key: K, default: V) -> V:
        """The value; ``default``, now stored, if absent."""
        value = self.get(key)
        if value is None:
            value = default
            self.put(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._limit:
            self._data.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._data.pop(key, None)

    def values(self) -> list[V]:
        return list(self._data.values())

    def items(self) -> list[tuple[K, V]]:
        return list(self._data.items())

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)


@attrs.frozen
class _Entry(Generic[T]):
    value: T
    user: str
    tag: str | None
    expires_at: float


class SuccessCache(Generic[T]):
    """``key`` (an HMAC) → value, per user, with an optional tag (an app
    password's id). Dropping by user or tag costs what it drops, not a scan."""

    def __init__(self, clock: Callable[[], float], ttl: float, max_entries: int) -> None:
        self._clock = clock
        self.ttl = ttl
        self._max = max_entries
        self._entries: OrderedDict[bytes, _Entry[T]] = OrderedDict()
        self._by_user: dict[str, set[bytes]] = {}
        self._by_tag: dict[str, set[bytes]] = {}

    def get(self, key: bytes) -> T | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.expires_at:
            self._remove(key)
            return None
        return entry.value

    def put(
        self,
        key: bytes,
        value: T,
        *,
        user: str,
        tag: str | None = None,
        expires_at: float | None = None,
    ) -> None:
        if self.ttl <= 0:
            return
        until = self._clock() + self.ttl
        if expires_at is not None:
            until = min(until, expires_at)
        self._remove(key)
        self._entries[key] = _Entry(value, user, tag, until)
        self._by_user.setdefault(user, set()).add(key)
        if tag is not None:
            self._by_tag.setdefault(tag, set()).add(key)
        while len(self._entries) > self._max:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for index, name in ((self._by_user, entry.user), (self._by_tag, entry.tag)):
            if name is not None:
                keys = index.get(name)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[name]

    def drop_tag(self, tag: str) -> None:
        for key in list(self._by_tag.get(tag, ())):
            self._remove(key)

    def drop_user(self, user: str) -> None:
        for key in list(self._by_user.get(user, ())):
            self._remove(key)

    def clear(self) -> None:
        self._entries.clear()
        self._by_user.clear()
        self._by_tag.clear()

    def __len__(self) -> int:
        return len(self._entries)
