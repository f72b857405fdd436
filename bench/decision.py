"""What a warm sign-in's decision costs in memory, part by part, on one
core, with no sockets: the Authenticator of the unit tests (tests/unit/
fakes.py: a fake directory, the real SQLite store, a task.Clock) with the
daemon's metrics and a real audit log to a file.

    .venv/bin/python -m bench.decision [--rounds 20000]

Measures, each alone and best of five: ``authenticate()`` of a warm
app-password sign-in as the daemon runs it (decided by ``decide_cached``,
no coroutine below), the same without the fast path (the full coroutine
chain: the proxy before #29), ``decide_cached`` with no metrics and no audit,
and the parts a cached sign-in adds: the HMAC lookup key, the metrics, the
audit event (its JSON line and the file write, as the audit thread makes
them); then a whole warm re-bind through the LDAP front end, bytes in and
answer out, on an in-memory transport.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred

from bench.harness import best
from proxy.audit import AuditLog
from proxy.auth.authenticator import Authenticator
from proxy.metrics import Metrics
from tests.unit.fakes import Core
from tests.unit.test_authenticator import attempt

SECRET = "Passw0rd-primary"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20_000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lap-decision-"))
    core = Core(folder)
    auth = core.build(account_cache=3600.0)
    core.directory.add("alice", SECRET)
    app = core.admin.create("alice", "phone").secret
    imap = attempt("alice", app)
    first = ensureDeferred(auth.authenticate(imap))
    core.clock.advance(60)
    assert first.result.accepted
    audit = AuditLog(folder / "audit.log", core.clock.seconds)
    del core.events[:]

    def record(event: str, **fields: Any) -> None:
        core.events.append(audit.event(event, **fields))
        if len(core.events) > 1000:
            del core.events[:]

    def authenticate() -> None:
        ensureDeferred(auth.authenticate(imap)).result  # noqa: B018 (decided at once)

    figures: dict[str, float] = {}
    bare = best(lambda: auth.decide_cached(imap), args.rounds)  # no metrics, events to a list
    auth.metrics = Metrics()
    auth.events._record = record
    figures["authenticate(), warm (the fast path)"] = best(authenticate, args.rounds)
    fast = Authenticator.decide_cached
    Authenticator.decide_cached = lambda self, attempt: None  # type: ignore[method-assign]
    try:
        figures["authenticate(), warm, without the fast path (before)"] = best(authenticate,
                                                                                args.rounds)
    finally:
        Authenticator.decide_cached = fast  # type: ignore[method-assign]
    figures["decide_cached(), all in"] = best(lambda: auth.decide_cached(imap), args.rounds)
    figures["decide_cached(), no metrics, audit event appended to a list"] = bare
    figures["  HMAC lookup key"] = best(lambda: auth.apps.key("alice", app.replace(" ", "")),
                                        args.rounds)
    metrics = auth.metrics
    figures["  metrics (sign-in counter and histogram, cache counter)"] = best(
        lambda: (metrics.sign_in("imap", "cloud", "accepted", "app_password", 0.0),
                 metrics.cache("app_password", True)), args.rounds)
    decision = first.result
    figures["  audit event (fields, checked)"] = best(
        lambda: auth.events.audit(imap, decision), args.rounds)
    event = audit.event("authentication", outcome="accepted", reason="app_password", user="alice",
                        app_password_id=1, protocol="imap", realm="cloud",
                        client_address="192.0.2.10", tls=True)
    figures["  audit line (JSON) and its write, on the audit thread"] = best(
        lambda: audit.append_lines([audit.line(event)]), args.rounds // 10)
    figures["a warm re-bind through the LDAP front end (bytes in, answer out)"] = ldap_rebind(
        args.rounds)
    for name, us in figures.items():
        print(f"| {name} | {us:.1f} µs |")


def ldap_rebind(rounds: int) -> float:
    """µs a bind: the LDAP front end of tests/unit/test_frontends.py (an
    in-memory transport) taking an app password's bind again and again on
    one connection, with the daemon's metrics and audit events made as the
    daemon makes them. What a cached bind costs the proxy on its reactor
    thread, less Twisted's and the system's part (bench/floor.py measures
    those); the audit line and its write are the audit thread's, timed
    above."""
    from proxy.sessions import Sessions
    from tests.unit import test_frontends as frontends

    folder = Path(tempfile.mkdtemp(prefix="lap-decision-ldap-"))
    core = Core(folder)
    core.build(account_cache=3600.0)
    core.directory.add("alice", SECRET)
    core.sessions = Sessions(core.clock, core.directory, 1.0, core.auth)
    core.auth.sessions = core.sessions.registry
    core.auth.on_revoked(core.sessions.revoked)
    core.auth.metrics = Metrics()
    audit = AuditLog(folder / "audit.log", core.clock.seconds)

    def record(event: str, **fields: Any) -> None:
        core.events.append(audit.event(event, **fields))
        if len(core.events) > 1000:
            del core.events[:]

    core.auth.events._record = record
    app = core.admin.create("alice", "printer").secret
    server, client, _ = frontends.connect(core, "ldap")
    frame = frontends.bind(1, "alice", app)
    server.dataReceived(frame)
    frontends.settle(core)
    answer = client.take()

    def bind() -> None:
        server.dataReceived(frame)
        client.clear()

    bind()
    server.dataReceived(frame)
    assert client.take() == answer  # accepted, from memory
    return best(bind, rounds)


if __name__ == "__main__":
    main()
