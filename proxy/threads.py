"""Blocking work off the reactor thread, in bounded pools.

argon2 is CPU-bound, SQLite and file writes block: the reactor thread does
none of it. Each kind of work gets its own pool, so that a burst of argon2
checks never delays a store write, and each pool refuses work at once when
its queue is full rather than letting latency grow without bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class Busy(Exception):
    """The pool's queue is full: the caller should answer with a temporary failure."""


class Pool:
    """``threads`` threads and at most ``queue`` calls waiting for one."""

    def __init__(self, reactor: Any, name: str, threads: int, queue: int) -> None:
        self._reactor: IReactorThreads | IReactorCore = reactor
        self.name = name
        self.threads = threads
        self.limit = threads + queue
        self.pending = 0
        self.refused = 0
        self._pool = ThreadPool(minthreads=threads, maxthreads=threads, name=name)

    def start(self) -> None:
        """Start the threads; whoever starts a pool stops it (the daemon's
        service tree, last of all)."""
        self._pool.start()

    def stop(self) -> None:
        if self._pool.started:
            self._pool.stop()

    def submit(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        if self.pending >= self.limit:
            self.refused += 1
            return fail(Busy(f"{self.name}: {self.pending} calls under way"))
        self.pending += 1
        d = deferToThreadPool(self._reactor, self._pool, function, *args, **kwargs)
        d.addBoth(self._finished)
        return d

    def start_soon(self, function: Callable[[], object]) -> None:
        """``function`` on a thread of the pool with no answer to the reactor
        (no waker-pipe write, no reactor turn for it), not counted in
        :attr:`pending`: for a caller that bounds and tracks its own work
        (the audit writer keeps one such call at a time). Its exceptions
        are its own to catch."""
        self._pool.callInThread(function)

    def _finished(self, result: T) -> T:
        self.pending -= 1
        return result


class Threaded:
    """Every method of ``target``, called on ``pool`` and answered with a Deferred.

    The store and the audit log are synchronous objects; the daemon reaches
    them through this, with a one-thread pool each, so that a SQLite
    connection is only ever used by one thread.
    """

    def __init__(self, target: Any, pool: Pool) -> None:
        self._target = target
        self._pool = pool

    def __getattr__(self, name: str) -> Callable[..., Deferred[Any]]:
        method = getattr(self._target, name)
        if not callable(method):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Deferred[Any]:
            return self._pool.submit(method, *args, **kwargs)

        call.__name__ = name
        return call
