"""The daemon as a tree of services, and what it tells systemd."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

log = Logger(namespace="legacy_auth_proxy.service")


def sd_notify(state: str) -> None:
    """Tell systemd how the service is (``READY=1``, ``RELOADING=1``, …), if it asked."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), address)
        except OSError as e:
            log.warn("cannot notify systemd: {error}", error=e.strerror)


def watchdog(reactor: Any) -> Any:
    """systemd's watchdog (``WatchdogSec=``): ``WATCHDOG=1`` at half the
    interval it asked for, from the reactor thread, so that a reactor that
    stops turning (blocked, deadlocked) gets the daemon restarted. None if
    systemd asked for no watchdog."""
    from twisted.internet.task import LoopingCall

    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    loop = LoopingCall(sd_notify, "WATCHDOG=1")
    loop.clock = reactor
    loop.start(int(usec) / 2e6, now=True)
    return loop


class Ordered(MultiService):
    """Children start in the order they are added and stop in the reverse
    order, each stop finished before the next begins: the listeners stop
    taking connections before the core writes what it holds, the audit log
    is written before the store closes, and the pools stop last."""

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)

        async def stop() -> None:
            for child in reversed(list(self)):
                try:
                    await maybeDeferred(child.stopService)
                except Exception:
                    log.failure("{name} did not stop cleanly", name=child.name)

        return Deferred.fromCoroutine(stop())

    def part(self, name: str, start: Any = None, stop: Any = None) -> Part:
        """Add a part; it starts at once if the tree is running."""
        part = Part(name, start, stop)
        part.setServiceParent(self)
        return part


class Part(Service):
    """One part of the daemon in the tree: what starts it and what stops it."""

    def __init__(self, name: str, start: Any = None, stop: Any = None) -> None:
        self.name = name
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        super().startService()
        if self._start is not None:
            self._start()

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        return maybeDeferred(self._stop) if self._stop is not None else None
