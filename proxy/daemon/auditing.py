"""The daemon's audit events: to the Twisted log at once, to the file by
the audit thread, the events of a few milliseconds handed over together in
one step that needs no answer (no waker-pipe write, no reactor turn for
it, no thread wake-up while the writer is busy)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy.audit import AuditLog
from proxy.config import AuditConfig
from proxy.threads import Pool

log = Logger(namespace="legacy_auth_proxy.service")

# At most one hand-over to the audit thread in this many seconds. Each wakes
# the thread, which then takes the GIL from the reactor and gives it back
# (futex calls on both threads): once a reactor turn under load, that was a
# tenth of a warm IMAP login's system calls and of its CPU. The first event
# after a quiet moment is handed over at the end of its turn, as before; under
# load, a line reaches the file this much later at most.
GATHER = 0.02


class _Mark:
    """A point in the order of the events: ``action`` done on the audit
    thread when every event before it is written, then ``done`` fired on
    the reactor thread (a stop's last write, a reopen)."""

    def __init__(self, action: Callable[[], object] | None = None) -> None:
        self.action = action
        self.done: Deferred[None] = Deferred()


class AuditBatches:
    """Records the daemon's audit events. ``log_authentications`` False:
    sign-ins go to the file only (the daemon's log has a line for each
    failure, for fail2ban, already).

    The events of a reactor turn, or under load of up to :data:`GATHER`
    seconds, are put together, in one step under a lock, on a queue the
    audit thread writes from, each time all of it in one ``write``. The
    thread is started on the audit pool when it is idle, with no answer to
    the reactor; while it writes, the events gathered next only join the
    queue: under load, one wake-up of the thread for many sign-ins, and none
    of the reactor turns the answers took.
    At most :attr:`MAX_WAITING` events wait (a disk that does not answer must
    not take the daemon's memory); past that an event is dropped, counted in
    :attr:`dropped` and as a refusal of the audit pool (the
    ``pool_refusals{pool="audit"}`` metric), and logged."""

    MAX_WAITING = 100_000

    def __init__(self, reactor: Any, audit: AuditLog, pool: Pool,
                 log_authentications: bool) -> None:
        self._reactor = reactor
        self.audit = audit
        self._pool = pool
        self.log_authentications = log_authentications
        self._batch: list[Any] = []  # gathered: JSON lines, events to make into lines
        self._scheduled = False  # a call hands it over: at the turn's end, or GATHER after the last
        self._handed_at = float("-inf")
        self._lock = threading.Lock()  # for the two below, shared with the audit thread
        self._queue: list[Any] = []  # lines, events and marks, for the audit thread
        self._running = False  # the audit thread is writing from the queue
        self.dropped = 0
        self._dropping = 0  # dropped since the last hand-over, for its log line
        # Every event to the webhooks' outbox too, when there are webhooks
        # (proxy.daemon.webhooks.OutboxWriter.add).
        self.outbox: Callable[[dict[str, Any]], None] | None = None

    def record(self, event: str, **fields: Any) -> None:
        """One audit event: to the Twisted log now, to the file with the
        other events gathered with it."""
        record = self.audit.event(event, **fields)
        if self.outbox is not None:
            self.outbox(record)
        if event == "authentication" and not self.log_authentications:
            # Its JSON is made on the audit thread, off the sign-in's path.
            entry: Any = record
        else:
            entry = self.audit.log(record)
        if len(self._batch) + len(self._queue) >= self.MAX_WAITING:
            self._drop()
            return
        self._batch.append(entry)
        if not self._scheduled:
            self._scheduled = True
            wait = self._handed_at + GATHER - self._reactor.seconds()
            self._reactor.callLater(max(wait, 0.0), self._gathered)

    def _drop(self) -> None:
        self.dropped += 1
        self._pool.refused += 1
        if not self._dropping:
            log.error("the audit file cannot keep up (the disk is slow or full): "
                      "audit events are being dropped from the file")
        self._dropping += 1

    def _gathered(self) -> None:
        self._scheduled = False
        self._hand_over()

    def _hand_over(self, mark: _Mark | None = None) -> None:
        """The events gathered (and ``mark`` after them) to the audit thread."""
        batch, self._batch = self._batch, []
        if mark is not None:
            batch.append(mark)
        if self._dropping:
            log.warn("{count} audit events were dropped from the file", count=self._dropping)
            self._dropping = 0
        if not batch:
            return
        self._handed_at = self._reactor.seconds()
        with self._lock:
            self._queue.extend(batch)
            if self._running:
                return
            self._running = True
        self._pool.start_soon(self._drain)

    def _drain(self) -> None:
        """On the audit thread: write until the queue is empty."""
        while True:
            with self._lock:
                items, self._queue = self._queue, []
                if not items:
                    self._running = False
                    return
            self._write(items)

    def _write(self, items: list[Any]) -> None:
        line = self.audit.line
        lines: list[str] = []
        for item in items:
            if not isinstance(item, _Mark):
                try:
                    lines.append(item if isinstance(item, str) else line(item))
                except Exception:
                    self._reactor.callFromThread(log.failure, "cannot make an audit line",
                                                 Failure())
                continue
            self._append(lines)
            lines = []
            try:
                if item.action is not None:
                    item.action()
            except Exception:
                self._reactor.callFromThread(item.done.errback, Failure())
            else:
                self._reactor.callFromThread(item.done.callback, None)
        self._append(lines)

    def _append(self, lines: list[str]) -> None:
        try:
            self.audit.append_lines(lines)
        except Exception:
            self._reactor.callFromThread(log.failure, "cannot write the audit log", Failure())

    def write(self) -> Deferred[None]:
        """Write what is waiting (the daemon's stop calls it last); fires
        when every event recorded so far is written."""
        mark = _Mark()
        self._hand_over(mark)
        return mark.done

    def reopen(self, config: AuditConfig) -> Deferred[None]:
        """SIGHUP: let the file go (logrotate) and write to ``config.file``
        from now on. Call it before any await of the reload: every event
        recorded before goes to the file before, every one after to the new
        one, in the order of the audit thread's queue."""
        self.log_authentications = config.log_authentications
        mark = _Mark(lambda: self.audit.reopen(config.file))
        self._hand_over(mark)
        return mark.done


class FromThread:
    """Audit events recorded by :class:`proxy.admin.Admin` on the store's
    thread, handed to the reactor thread's ``record``."""

    def __init__(self, reactor: Any, record: Any) -> None:
        self._reactor = reactor
        self._record = record

    def record(self, event: str, **fields: Any) -> None:
        self._reactor.callFromThread(self._record, event, **fields)

    def close(self) -> None:
        pass
