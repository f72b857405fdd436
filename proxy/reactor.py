"""The daemon's reactor: Twisted's epoll reactor, each ready socket handed
to its transport directly.

Twisted's own loop wraps every event in ``log.callWithLogger``: it asks the
transport for its ``logPrefix()`` and sets and restores a log context around
the call (1.4 µs an event measured alone; a warm IMAP login is a dozen
events, an LDAP bind one), only to name the connection in lines of the
legacy ``twisted.python.log``. The proxy's lines come from
``twisted.logger``, each with a namespace of its own, and do not use that
context. What the wrapper also does is kept: an exception out of a
transport is logged, never raised out of the loop. Installed by
:func:`proxy.runner.run_daemon`; :mod:`proxy.twistedcheck` checks the
names of Twisted's it uses.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger(namespace="legacy_auth_proxy.reactor")


class Reactor(EPollReactor):
    def doPoll(self, timeout: float | None) -> None:
        try:
            # As many events as there are sockets at most, as Twisted's does.
            events = self._poller.poll(-1 if timeout is None else timeout,
                                       len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this poll
            try:
                dispatch(selectable, fd, event)
            except Exception:
                log.failure("an event on a connection failed")

    doIteration = doPoll


def install() -> Any:
    """Make :class:`Reactor` the process's reactor, unless one is chosen
    already (a test's): then that one stays. Returns the reactor."""
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet.main import installReactor

        installReactor(Reactor())
    from twisted.internet import reactor

    return reactor
