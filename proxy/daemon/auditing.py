"""The daemon's audit events: to the Twisted log at once, to the file in
batches on the audit pool (one write per reactor turn)."""

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
    failure, for fail2ban, already)."""

    def __init__(self, reactor: Any, audit: AuditLog, pool: Pool,
                 log_authentications: bool) -> None:
        self._reactor = reactor
        self.audit = audit
        self._pool = pool
        self.log_authentications = log_authentications
        self._batch: list[Any] = []  # JSON lines, or events to make into lines
        # Every event to the webhooks' outbox too, when there are webhooks
        # (proxy.daemon.webhooks.OutboxWriter.add).
        self.outbox: Callable[[dict[str, Any]], None] | None = None

    def record(self, event: str, **fields: Any) -> None:
        """One audit event: to the Twisted log now, to the file on the audit
        pool. Events of one reactor turn are written together, with one write."""
        record = self.audit.event(event, **fields)
        if self.outbox is not None:
            self.outbox(record)
        if event == "authentication" and not self.log_authentications:
            # Its JSON is made on the audit thread, off the sign-in's path.
            self._batch.append(record)
        else:
            self._batch.append(self.audit.log(record))
        if len(self._batch) == 1:
            self._reactor.callLater(0, self.write)

    def write(self) -> Deferred[None]:
        """Write what is waiting (the daemon's stop calls it last)."""
        batch, self._batch = self._batch, []
        line = self.audit.line

        def write() -> None:
            self.audit.append_lines([r if isinstance(r, str) else line(r) for r in batch])

        return self._pool.submit(write).addErrback(
            lambda f: log.failure("cannot write the audit log", f)
        )

    def reopen(self, config: AuditConfig) -> Deferred[None]:
        """SIGHUP: let the file go (logrotate) and write to ``config.file``
        from now on. Call it before any await of the reload: the audit pool
        runs its calls in order, so every batch sent from here on goes there."""
        self.log_authentications = config.log_authentications
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
