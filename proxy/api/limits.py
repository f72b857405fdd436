"""Requests a minute per API token: a token bucket each, no I/O, the clock
passed in (tested on ``task.Clock``)."""

from __future__ import annotations

import math
from collections.abc import Callable

from proxy.auth.cache import LRU


class Bucket:
    __slots__ = ("level", "at")

    def __init__(self, level: float, at: float) -> None:
        self.level = level
        self.at = at


class Limits:
    """``rate`` requests a minute for each key: a burst of a minute's worth,
    refilled evenly. Keys past ``keys`` are forgotten, least recently used
    first (a forgotten key starts full: no caller gains more than a burst)."""

    def __init__(self, clock: Callable[[], float], keys: int = 10_000) -> None:
        self._clock = clock
        self._buckets: LRU[str, Bucket] = LRU(keys)

    def _refilled(self, key: str, rate: int) -> Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = Bucket(float(rate), now)
            self._buckets.put(key, bucket)
        bucket.level = min(float(rate), bucket.level + (now - bucket.at) * rate / 60.0)
        bucket.at = now
        return bucket

    def take(self, key: str, rate: int) -> int:
        """Count one request: 0 if it may go on, else the whole seconds to
        wait before the next one can (the answer's ``Retry-After``)."""
        bucket = self._refilled(key, rate)
        if bucket.level >= 1.0:
            bucket.level -= 1.0
            return 0
        return self.waiting(key, rate)

    def waiting(self, key: str, rate: int) -> int:
        """Seconds before ``key`` may make a request, counting none."""
        bucket = self._refilled(key, rate)
        if bucket.level >= 1.0:
            return 0
        return max(1, math.ceil((1.0 - bucket.level) * 60.0 / rate))
