"""The audit log: one JSON object a line, for every change and every decision.

Each event goes to the configured file (appended with O_APPEND, so the daemon
and the command line tool can write to the same file) and to the Twisted log.
Events name users, app passwords by id and name, addresses and reasons; never
a secret, a hash or a lookup key. The daemon writes through its own
one-thread pool (see :mod:`proxy.threads`); the command line tool writes
directly.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from twisted.logger import Logger, LogLevel

from proxy.apppasswords import adopt_parent_owner
from proxy.wire.text import json_printable

log = Logger(namespace="legacy_auth_proxy.audit")

# Field names that must never be written, whatever a caller passes.
_FORBIDDEN = frozenset({"secret", "password", "password_hash", "hash", "lookup_key"})


_last_second: list[Any] = [None, ""]


def timestamp(seconds: float) -> str:
    """RFC 3339 in UTC with milliseconds: ``2026-11-22T01:02:03.456Z``."""
    whole = int(seconds // 1)
    if _last_second[0] != whole:  # formatting a date is slow; once a second will do
        moment = datetime.fromtimestamp(whole, timezone.utc)
        _last_second[:] = [whole, moment.strftime("%Y-%m-%dT%H:%M:%S.")]
    return f"{_last_second[1]}{int((seconds - whole) * 1000):03d}Z"


def minute(seconds: float | None, never: str = "never") -> str:
    """A time for people to read, to the minute: ``2026-12-01 04:32 UTC``."""
    if seconds is None:
        return never
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def recent_events(path: Path, predicate: Callable[[dict[str, Any]], bool], limit: int,
                  max_bytes: int, needle: bytes | None = None) -> list[dict[str, Any]]:
    """The last ``limit`` events of the audit file matching ``predicate``,
    newest first, from at most its last ``max_bytes``; with ``needle``, only
    lines holding it are parsed at all (a user's events among everyone's
    cost a byte search each, not a JSON parse). Blocks: the daemon calls it
    on its files pool."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read(size - start)
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first may be cut
    found: list[dict[str, Any]] = []
    for line in reversed(lines):
        if not line.strip() or (needle is not None and needle not in line):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and predicate(event):
            found.append(event)
            if len(found) >= limit:
                break
    return found


class _Same:
    """For :meth:`AuditLog.reopen`: the path stays."""


SAME = _Same()


class AuditLog:
    """Writes audit events. ``path`` None: the Twisted log only."""

    def __init__(self, path: Path | None, clock: Callable[[], float]) -> None:
        self.path = path
        self._clock = clock
        self._fd: int | None = None
        self._lock = threading.Lock()

    def event(self, event: str, **fields: Any) -> dict[str, Any]:
        """Build one event; fields whose value is None are left out."""
        if not _FORBIDDEN.isdisjoint(fields):
            raise ValueError(f"audit events never carry {sorted(_FORBIDDEN.intersection(fields))}")
        record: dict[str, Any] = {"time": timestamp(self._clock()), "event": event}
        for name, value in fields.items():  # a loop: a sign-in's event costs a third less
            if value is not None:
                record[name] = value
        return record

    @staticmethod
    def line(record: dict[str, Any]) -> str:
        # Readable UTF-8, except what is not printable (U+2028 in a user
        # name, an escape sequence in an address): escaped, so that the line
        # stays one line for every reader and shows as text on a terminal.
        # orjson makes the same compact JSON as json.dumps twenty times
        # faster; a string it refuses (a lone surrogate, from a client's
        # undecodable bytes) goes the slow way.
        try:
            made = orjson.dumps(record).decode()
        except orjson.JSONEncodeError:
            made = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        return json_printable(made)

    def log(self, record: dict[str, Any], level: LogLevel = LogLevel.info) -> str:
        """Send one event to the Twisted log (on the reactor thread, in the
        daemon); its JSON line, for :meth:`append_lines`."""
        line = self.line(record)
        log.emit(level, "audit {audit_line}", audit_line=line, audit=record)
        return line

    def append(self, record: dict[str, Any]) -> None:
        """Append one event to the file. Blocks: the daemon calls it on the audit pool."""
        self.append_many([record])

    def append_many(self, records: list[dict[str, Any]]) -> None:
        """Append events with one write. Blocks: the daemon calls it on the audit pool."""
        self.append_lines([self.line(r) for r in records])

    def append_lines(self, lines: list[str]) -> None:
        """Append JSON lines with one write. Blocks."""
        if self.path is None or not lines:
            return
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        with self._lock:
            if self._fd is None:
                self._fd = self._open()
            os.write(self._fd, data)

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Build, log and append one event, blocking: for the command line tool."""
        record = self.event(event, **fields)
        self.log(record)
        self.append(record)
        return record

    def _open(self) -> int:
        assert self.path is not None
        existed = self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if not existed:
            adopt_parent_owner(self.path)
        return fd

    def reopen(self, path: Path | None | _Same = SAME) -> None:
        """Close the file so that the next event opens it anew (after
        logrotate), at ``path`` if one is given (a reload that changed
        ``audit.file``). Blocks. The path changes with the file closed, under
        the lock the writes take: a write never reopens the old path after
        a reload has moved it."""
        with self._lock:
            if not isinstance(path, _Same):
                self.path = path
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def close(self) -> None:
        self.reopen()
