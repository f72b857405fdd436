"""The one place that takes the global reactor: runs the daemon until it stops."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    Logger,
    formatEventAsClassicLogText,
    globalLogBeginner,
    textFileLogObserver,
)

from proxy import config as configuration
from proxy.bootstrap import StartupError, StoreUnreachable
from proxy.daemon.supervisor import WorkerRole, supervise, worker_count
from proxy.reactor import Reactor
from proxy.service import serve
from proxy.twistedcheck import TwistedMismatch, check_twisted

EX_TEMPFAIL = 75
EX_CONFIG = 78

log = Logger(namespace="legacy_auth_proxy.service")


# Twisted's own lines for every port opened and closed ("IMAPListener starting
# on 10143", "(TCP Port 10143 Closed)"): the daemon says "listening: NAME" itself.
# With workers, their metrics' and the supervisor's notification sockets
# ("Site starting on '/tmp/...'", "(Port '/tmp/...' Closed)") likewise.
_PORT_NOISE = re.compile(
    r"^(?:.+ starting on (?:\d+|'[^']*')|\((?:(?:TCP|UNIX) )?Port \S+ Closed\))$")


def quiet_ports(event: dict) -> PredicateResult:
    namespace = event.get("log_namespace", "")
    if namespace == "log_legacy" and _PORT_NOISE.match(formatEvent(event)):
        return PredicateResult.no
    # Every reconnection attempt of every pooled directory connection: the
    # directory client says once that the directory is unreachable, and
    # once that it answers again.
    if namespace.startswith("twisted.application._client_service") \
            and event.get("log_level") in (LogLevel.info, LogLevel.debug):
        return PredicateResult.no
    return PredicateResult.maybe


# sd-daemon(3) priorities, by log level: the journal then files each line
# under its level (journalctl -p warning shows what needs a look).
_PRIORITY = {LogLevel.critical: 2, LogLevel.error: 3, LogLevel.warn: 4, LogLevel.info: 6,
             LogLevel.debug: 7}


def journal_line(event: dict) -> str | None:
    """One line for the journal: its priority prefix, then the namespace,
    level and text (journald adds the time)."""
    text = formatEventAsClassicLogText(event, formatTime=lambda _: "")
    if text is None:
        return None
    level = event.get("log_level", LogLevel.info)
    return f"<{_PRIORITY.get(level, 6)}>" + text.lstrip(" ")


def log_observer(worker: int | None = None) -> ILogObserver:
    """Text lines on standard output, info and above, without Twisted's port
    noise. Under systemd (JOURNAL_STREAM set), with priority prefixes and
    without a time, which journald adds. One of several workers names
    itself in each line (``[worker 1 legacy_auth_proxy.service#info]``):
    they all write to the supervisor's output."""
    if os.environ.get("JOURNAL_STREAM"):
        observer: ILogObserver = FileLogObserver(sys.stdout, journal_line)
    else:
        observer = textFileLogObserver(sys.stdout, timeFormat="%Y-%m-%dT%H:%M:%S%z")
    if worker is not None:
        observer = _named(observer, f"worker {worker}")
    return FilteringLogObserver(
        observer, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info), quiet_ports]
    )


def _named(observer: ILogObserver, name: str) -> ILogObserver:
    def named(event: dict) -> None:
        system = event.get("log_system") or "{}#{}".format(
            event.get("log_namespace", "-"), getattr(event.get("log_level"), "name", "-"))
        observer({**event, "log_system": f"{name} {system}"})

    return named


# Buffers from this size up get a mapping of their own (see below). The
# relay's reads and TLS's record reads stay under it (frontends.base, tls).
MMAP_THRESHOLD = 128 * 1024


def give_memory_back() -> None:
    """glibc raises its mmap threshold each time a large block is freed, and
    from then on keeps large buffers in its heap: memory that clients made
    the daemon hold before login (unfinished LDAP messages) stayed with the
    process after they left. A fixed threshold keeps each large buffer in a
    mapping of its own, returned to the system when it is freed."""
    M_MMAP_THRESHOLD = -3
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass  # not glibc


def run_daemon(config_path: Path, config: configuration.Config) -> NoReturn:
    """Start logging and run the reactor until SIGTERM or SIGINT; exits the process."""
    from twisted.internet import task

    try:
        check_twisted()
    except TwistedMismatch as e:
        print(f"legacy-auth-proxy: cannot start: {e}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    role = WorkerRole.from_environment()
    if role is not None:
        role.watch_supervisor()
        # Until the daemon's handler is in place: a reload of the others
        # must not end a worker that is still starting.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    give_memory_back()
    globalLogBeginner.beginLoggingTo([log_observer(role.index if role else None)],
                                     redirectStandardIO=False)

    async def main(reactor: Any) -> None:
        if not isinstance(reactor, Reactor):
            log.info("running on Twisted's {kind} (started other than by legacy-auth-proxy or "
                     "python -m proxy): each connection's event costs a little more",
                     kind=type(reactor).__name__)
        try:
            if role is None and worker_count(config) > 1:
                code = await supervise(reactor, config_path, config)
                if code:
                    raise SystemExit(code)
                return
            await serve(reactor, config_path, config, role)
        except StoreUnreachable as e:
            # Exit and be started again rather than wait in the process: the
            # supervisor already does the waiting (systemd's Restart=, the
            # unit's RestartSec=; a container's restart policy), every start
            # is a clean one (no half-built daemon waiting with its pools and
            # directory connections), and a daemon that waited before
            # READY=1 would hold `systemctl start` and the boot's ordering
            # until TimeoutStartSec, then be killed as a start that hung.
            print(f"legacy-auth-proxy: cannot start now: {e}; temporary: exit 75, "
                  f"to be started again", file=sys.stderr)
            raise SystemExit(EX_TEMPFAIL) from None
        except StartupError as e:
            print(f"legacy-auth-proxy: cannot start: {e}", file=sys.stderr)
            raise SystemExit(EX_CONFIG) from None

    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
