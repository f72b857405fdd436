"""Audit events as rows of the store's outbox: which webhooks want each
event, the JSON body each is sent as, and the lane that orders it.

The daemon hands every audit event to its outbox writer
(:mod:`proxy.daemon.webhooks`); the command line tool, a process of its own,
writes its events here directly (:class:`OutboxAudit`), in the same
transaction's order as its audit lines. The format is docs/events.md's.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import Logger

from proxy.store import StoreError

log = Logger(namespace="legacy_auth_proxy.webhooks")

EVERY_EVENT = "*"


def wants(webhook: Any, event: str) -> bool:
    """Whether ``webhook`` (a :class:`proxy.config.WebhookConfig`) is sent ``event``."""
    return EVERY_EVENT in webhook.events or event in webhook.events


def event_id() -> str:
    """An event's id: the same for every webhook it goes to, and on every
    retry, so a receiver can tell a repeat from a new event."""
    return secrets.token_hex(16)


def body(record: dict[str, Any], id: str) -> str:
    """The JSON an event is sent as: its audit record, with its id first."""
    return json.dumps({"id": id, **record}, ensure_ascii=False, separators=(",", ":"))


def lane(record: dict[str, Any]) -> str:
    """What orders an event: its user's events reach a webhook in order
    (events of no user, like ``daemon_started``, share the lane "")."""
    user = record.get("user")
    return user if isinstance(user, str) else ""


def targets(record: dict[str, Any], webhooks: Iterable[Any]) -> tuple[str, ...]:
    """The names of the webhooks that want one audit record."""
    event = str(record.get("event", ""))
    return tuple(w.name for w in webhooks if wants(w, event))


Pending = tuple[tuple[str, ...], dict[str, Any]]  # (webhooks, audit record)


def encode(pending: Iterable[Pending]) -> list[tuple[str, str, str, str]]:
    """Outbox rows (webhook, lane, event, body) of audit records and the
    webhooks that want them: one id and one body per record. The daemon
    calls it on the outbox's thread, off the sign-in's path."""
    found = []
    for names, record in pending:
        text = body(record, event_id())
        found += [(name, lane(record), str(record.get("event", "")), text) for name in names]
    return found


def rows(record: dict[str, Any], webhooks: Iterable[Any]) -> list[tuple[str, str, str, str]]:
    """The outbox rows of one audit record, one for each webhook that wants it."""
    names = targets(record, webhooks)
    return encode([(names, record)]) if names else []


class Encoding:
    """A store whose ``add_events`` takes :data:`Pending` records and
    encodes them first (on the caller's thread: the outbox's)."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def add_events(self, pending: list[Pending], now: float) -> None:
        self._store.add_events(encode(pending), now)


class OutboxAudit:
    """The command line tool's audit: each event to the audit log, as
    :class:`proxy.audit.AuditLog` writes it, then to the outbox, blocking.
    An outbox write that fails is logged, not raised: the change it tells
    of is made already."""

    def __init__(self, audit: Any, store: Any, webhooks: tuple[Any, ...],
                 clock: Callable[[], float]) -> None:
        self._audit = audit
        self._store = store
        self._webhooks = webhooks
        self._clock = clock

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        record = self._audit.record(event, **fields)
        found = rows(record, self._webhooks)
        if found:
            try:
                self._store.add_events(found, self._clock())
            except StoreError as e:
                log.error("event {event} not kept for webhooks: {error}", event=event,
                          error=str(e))
        return record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._audit, name)
