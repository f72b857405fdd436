"""Last uses of app passwords, written to the store in batches.

At most one store write per app password per ``interval``; uses in between
are added up. A write the store cannot take (an outage, a locked database)
loses nothing: its uses go back to the pending batch, merged with those
made since, and are written by the next flush once the store answers. The
batch is bounded (``MAX_PENDING`` app passwords); past it the oldest
pending uses are dropped, and said so.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from proxy.store import StoreError

log = Logger(namespace="legacy_auth_proxy.auth")

MAX_PENDING = 100_000

# (last used at, from where, over which protocol, how many uses)
Use = tuple[float, "str | None", str, int]


def merged(older: Use, newer: Use) -> Use:
    """Two batches of one app password's uses as one: the later use's
    time, address and protocol, and the count of both."""
    first, second = (older, newer) if older[0] <= newer[0] else (newer, older)
    return (second[0], second[1], second[2], first[3] + second[3])


class UsageRecorder:
    def __init__(self, clock: Any, store: Any, interval: float) -> None:
        self._clock = clock
        self._store = store
        self._interval = interval
        self._written: dict[str, float] = {}
        self._pending: dict[str, Use] = {}
        self._loop = LoopingCall(self.flush)
        self._loop.clock = clock
        self.writes = 0
        self.failing = False  # the last write failed: said once, and once when it works again
        self.dropped = 0  # uses lost past MAX_PENDING

    def start(self) -> None:
        if self._interval > 0:
            self._loop.start(self._interval, now=False)

    def stop(self) -> Deferred[Any]:
        if self._loop.running:
            self._loop.stop()

        def said(result: Any) -> Any:
            if self._pending:
                log.warn("{count} app passwords' last uses could not be written before stopping",
                         count=len(self._pending))
            return result

        return self.flush().addBoth(said)

    def used(self, id: str, at: float, address: str | None, protocol: str) -> None:
        self._keep(id, (at, address, protocol, 1))
        if at - self._written.get(id, float("-inf")) >= self._interval:
            self._write(id)

    def forget(self, id: str) -> None:
        self._pending.pop(id, None)
        self._written.pop(id, None)

    def pending(self) -> int:
        """App passwords whose last uses wait to be written."""
        return len(self._pending)

    def _keep(self, id: str, use: Use) -> None:
        kept = self._pending.get(id)
        self._pending[id] = use if kept is None else merged(kept, use)
        if kept is None and len(self._pending) > MAX_PENDING:
            oldest = next(iter(self._pending))
            self.dropped += self._pending.pop(oldest)[3]

    def _write(self, id: str) -> Deferred[Any]:
        use = self._pending.pop(id)
        self._written[id] = self._clock.seconds()
        self.writes += 1
        d = self._store.record_use(id, *use)
        return d.addCallbacks(self._recorded, self._not_recorded, errbackArgs=(id, use))

    def _recorded(self, _: Any) -> None:
        if self.failing:
            self.failing = False
            log.info("the store takes last uses again; {count} more wait to be written",
                     count=len(self._pending))

    def _not_recorded(self, failure: Any, id: str, use: Use) -> None:
        """Sign-ins go on when the store cannot take a write (an outage, a
        locked database, a full disk): the uses are kept and written by the
        next flush."""
        if id in self._written or id in self._pending:
            self._keep(id, use)
        if failure.check(StoreError):
            if not self.failing:
                log.warn("cannot record last uses ({error}): kept, and written when the store "
                         "answers", error=str(failure.value))
        else:
            log.failure("cannot record the use of {id}", failure, id=id)
        self.failing = True

    def flush(self) -> Deferred[Any]:
        now = self._clock.seconds()
        for id, written in list(self._written.items()):
            if now - written > 10 * self._interval and id not in self._pending:
                del self._written[id]
        return gatherResults([self._write(id) for id in list(self._pending)])
