"""The directory client stopped while slapd is stopped with SIGSTOP (its TLS
connections up, look-ups in flight): the stop completes, asked twice, the
look-ups get the temporary failure, and nothing is logged as an error. (A
timed-out test's teardown once hit "reentrantly run _Client.stop"; the
in-memory cases are in tests/unit/test_directory_stop.py.)"""

from __future__ import annotations

import os
import signal

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import LogLevel, globalLogPublisher

from proxy.config import DirectoryConfig
from proxy.directory import Directory, DirectoryUnavailable

pytestmark = pytest.mark.integration

TIMEOUT = 2.0  # directory.timeout, seconds


@pytest.mark.parametrize("scheme", ["ldap+starttls", "ldaps"])
@pytest_twisted.ensureDeferred
async def test_the_client_stops_while_the_directory_is_stopped(slapd, tmp_path, scheme):
    password_file = tmp_path / "service-password"
    password_file.write_text(slapd.service_password + "\n")
    config = DirectoryConfig(
        url=slapd.url if scheme == "ldap+starttls" else slapd.ldaps_url, start_tls=True,
        bind_dn=slapd.service_dn, bind_password_file=password_file, user_base=slapd.people_dn,
        ca_file=slapd.ca_file, timeout=TIMEOUT, pool_size=2)
    errors = []

    def observe(event):
        if event.get("log_level", LogLevel.info) >= LogLevel.error:
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    directory = Directory(reactor, config, slapd.service_password, slapd.ca_file.read_bytes())
    directory.start()
    try:
        assert await directory.resolve("nobody-here") is None  # connected, bound
        pid = slapd._process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            lookups = [Deferred.fromCoroutine(directory.resolve(f"stalled-{i}")) for i in range(4)]
            for lookup in lookups:
                lookup.addErrback(lambda failure: failure.trap(DirectoryUnavailable))
            stops = [Deferred.fromCoroutine(directory.stop()) for _ in range(2)]
            # A bound, not a timing: the stop aborts what the directory never
            # closes after TIMEOUT.
            await gatherResults(stops).addTimeout(30 * TIMEOUT, reactor)
            await gatherResults(lookups).addTimeout(30 * TIMEOUT, reactor)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert all(not c.service.running
                   for pool in (directory._search, directory._bind) for c in pool._all)
        await directory.stop()  # once more, done at once
    finally:
        await directory.stop()
        globalLogPublisher.removeObserver(observe)
    assert errors == []
