"""The store's change feed, read by the core: what the command line tool,
the portal, the API or another node changed (deletions, revocations, MFA
states, lockouts), applied in order, once each."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from proxy.store import Change, StoreError
from proxy.threads import Busy

log = Logger(namespace="legacy_auth_proxy.auth")


class ChangeFeed:
    def __init__(self, clock: Any, store: Any, apply: Callable[[Change], None]) -> None:
        self._clock = clock
        self._store = store
        self._apply = apply
        self._seq = 0
        self._loop = LoopingCall(self.poll)
        self._loop.clock = clock
        self.ok_at: float | None = None  # when the feed last read the store
        self._error: str | None = None  # why it cannot be read, while it cannot

    @property
    def position(self) -> int:
        """The last change applied (the store numbers them in order)."""
        return self._seq

    async def start(self, interval: float,
                    then: Callable[[], Awaitable[None]] | None = None) -> None:
        """Read the feed from its end now, every ``interval`` seconds;
        ``then``: what to read of the store's state once that end is known
        (a change made meanwhile is then read from the feed, not missed)."""
        self._seq = await self._store.last_change()
        if then is not None:
            await then()
        self.ok_at = self._clock.seconds()
        self._loop.start(interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def every(self, interval: float) -> None:
        """Read the feed every ``interval`` seconds (often while the store
        cannot announce changes, seldom while it can)."""
        if self._loop.running:
            if self._loop.interval == interval:
                return
            self._loop.stop()
        self._loop.start(interval, now=False)

    async def poll(self) -> None:
        try:
            changes = await self._store.changes_since(self._seq)
        except (StoreError, Busy) as e:
            # An outage the node rides out: said once, and once when it ends
            # (an alert on critical lines must not fire for it).
            if self._error is None:
                log.warn("cannot read the store's change feed: {error}; retrying", error=str(e))
            self._error = str(e)
            return
        except Exception:
            log.failure("cannot read the store's change feed")
            return
        if self._error is not None:
            log.info("the store's change feed is read again")
            self._error = None
        self.ok_at = self._clock.seconds()
        for change in changes:
            if change.seq <= self._seq:
                continue  # applied by a poll that overlapped this one
            self._seq = change.seq
            self._apply(change)
