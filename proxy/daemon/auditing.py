"""The daemon's audit events: to the Twisted log at once, to the file in
batches on the audit pool, one batch on its way at a time: the events of
the reactor turns that pass while one is written go together in the next
(one hand-off to the audit thread and one write for all of them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from proxy.audit import AuditLog
from proxy.config import AuditConfig
from proxy.threads import Pool

log = Logger(namespace="legacy_auth_proxy.service")


class AuditBatches:
    """Records the daemon's audit events. ``log_authentications`` False:
    sign-ins go to the file only (the daemon's log has a line for each
    failure, for fail2ban, already).

    An event recorded while no batch is on its way is handed over at the end
    of its reactor turn; one recorded while a batch is being written goes with
    the next, handed over as soon as that write is done. Each hand-off costs
    the audit thread's wake-up and the reactor's turn for its answer: under
    load they are paid once for many sign-ins, not once a reactor turn.
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
        self._batch: list[Any] = []  # JSON lines, or events to make into lines
        self._scheduled = False  # a call at the end of this reactor turn hands it over
        self._writing = False  # a batch is on the audit pool
        self.dropped = 0
        self._dropping = 0  # dropped since the last batch handed over, for its log line
        # Every event to the webhooks' outbox too, when there are webhooks
        # (proxy.daemon.webhooks.OutboxWriter.add).
        self.outbox: Callable[[dict[str, Any]], None] | None = None

    def record(self, event: str, **fields: Any) -> None:
        """One audit event: to the Twisted log now, to the file on the audit
        pool, with the other events of its reactor turn (or of the turns that
        pass while the batch before is written) in one write."""
        record = self.audit.event(event, **fields)
        if self.outbox is not None:
            self.outbox(record)
        if event == "authentication" and not self.log_authentications:
            # Its JSON is made on the audit thread, off the sign-in's path.
            entry: Any = record
        else:
            entry = self.audit.log(record)
        if len(self._batch) >= self.MAX_WAITING:
            self._drop()
            return
        self._batch.append(entry)
        if not self._scheduled and not self._writing:
            self._scheduled = True
            self._reactor.callLater(0, self._turn_ended)

    def _drop(self) -> None:
        self.dropped += 1
        self._pool.refused += 1
        if not self._dropping:
            log.error("the audit file cannot keep up (the disk is slow or full): "
                      "audit events are being dropped from the file")
        self._dropping += 1

    def _turn_ended(self) -> None:
        self._scheduled = False
        if not self._writing:
            self._hand_over()

    def _hand_over(self) -> None:
        if not self._batch:
            return
        self._writing = True
        self._send().addBoth(self._written)

    def _written(self, _: object) -> None:
        self._writing = False
        self._hand_over()  # what came while it was written: at once, not a turn later

    def _send(self) -> Deferred[None]:
        """The waiting events to the audit pool, behind whatever is queued there."""
        batch, self._batch = self._batch, []
        if self._dropping:
            log.warn("{count} audit events were dropped from the file", count=self._dropping)
            self._dropping = 0
        line = self.audit.line

        def write() -> None:
            self.audit.append_lines([r if isinstance(r, str) else line(r) for r in batch])

        return self._pool.submit(write).addErrback(
            lambda f: log.failure("cannot write the audit log", f)
        )

    def write(self) -> Deferred[None]:
        """Write what is waiting now, behind the batch on its way if there is
        one (the daemon's stop calls it last); fires when it is written."""
        return self._send()

    def reopen(self, config: AuditConfig) -> Deferred[None]:
        """SIGHUP: let the file go (logrotate) and write to ``config.file``
        from now on. Call it before any await of the reload: the audit pool
        runs its calls in order, and the events waiting are sent ahead, so
        what was recorded before goes to the file before, and every batch
        sent from here on goes to the new one."""
        self.log_authentications = config.log_authentications
        if self._batch:
            self._send()
        return self._pool.submit(self.audit.reopen, config.file)


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
