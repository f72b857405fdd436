"""The daemon's reactor: Twisted's epoll reactor, each ready socket handed
to its transport directly.

Twisted's own loop wraps every event in ``log.callWithLogger``: it asks the
transport for its ``logPrefix()`` and sets and restores a log context around
the call (1.4 µs an event measured alone; a warm IMAP login is a dozen
events, an LDAP bind one), only to name the connection in lines of the
legacy ``twisted.python.log``. The proxy's own lines come from
``twisted.logger``, each with a namespace and the client's address, and do
not use that context. What is given up: the traceback Twisted logs when a
protocol raises (a bug) is tagged ``[-]`` instead of the connection's
prefix (its frames still name the protocol). What is kept: such an
exception is logged, never raised out of the loop, as Twisted's wrapper
does. Put in place by :mod:`proxy.__main__` before ldaptor takes the global
reactor; :func:`proxy.runner.run_daemon` says so in the log when the
daemon was started some other way and runs on Twisted's own.
:mod:`proxy.twistedcheck` checks the names of Twisted's it uses.
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
            except KeyboardInterrupt:
                raise
            except BaseException:  # as log.callWithLogger: SystemExit from a protocol too
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
