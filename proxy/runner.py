"""The one place that takes the global reactor: runs the daemon until it stops."""

from __future__ import annotations

import ctypes
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)

from proxy import config as configuration
from proxy.service import StartupError, serve

EX_CONFIG = 78


# Twisted's own lines for every port opened and closed ("IMAPListener starting
# on 10143", "(TCP Port 10143 Closed)"): the daemon says "listening: NAME" itself.
_PORT_NOISE = re.compile(r"^(?:.+ starting on \d+|\((?:TCP|UNIX) Port \S+ Closed\))$")


def quiet_ports(event: dict) -> PredicateResult:
    if event.get("log_namespace") == "log_legacy" and _PORT_NOISE.match(formatEvent(event)):
        return PredicateResult.no
    return PredicateResult.maybe


def log_observer() -> ILogObserver:
    """Text lines on standard output, info and above, without Twisted's port
    noise; journald adds its own time."""
    time_format = None if os.environ.get("JOURNAL_STREAM") else "%Y-%m-%dT%H:%M:%S%z"
    return FilteringLogObserver(
        textFileLogObserver(sys.stdout, timeFormat=time_format),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info), quiet_ports],
    )


def give_memory_back() -> None:
    """glibc raises its mmap threshold each time a large block is freed, and
    from then on keeps large buffers in its heap: memory that clients made
    the daemon hold before login (unfinished LDAP messages) stayed with the
    process after they left. A fixed threshold keeps each large buffer in a
    mapping of its own, returned to the system when it is freed."""
    M_MMAP_THRESHOLD = -3
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc


def run_daemon(config_path: Path, config: configuration.Config) -> NoReturn:
    """Start logging and run the reactor until SIGTERM or SIGINT; exits the process."""
    from twisted.internet import task

    give_memory_back()
    globalLogBeginner.beginLoggingTo([log_observer()], redirectStandardIO=False)

    async def main(reactor: Any) -> None:
        try:
            await serve(reactor, config_path, config)
        except StartupError as e:
            print(f"legacy-auth-proxy: cannot start: {e}", file=sys.stderr)
            raise SystemExit(EX_CONFIG) from None

    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
