"""Where the proxy's CPU goes under the benchmarks' load, part by part.

    .venv/bin/python -m bench.profile imap|smtp|ldap [--seconds 10] [--rate 100]

Starts slapd, Dovecot and the proxy as ``bench.run`` does, puts warm logins
(IMAP, SMTP) or warm binds on persistent connections (LDAP) on the proxy
from a load generator of its own, and samples the daemon with py-spy (the
``bench`` extra) meanwhile. Each sample goes to the innermost part its
stack is in (the HMAC, metrics, the audit event, logging, the decision,
the codec, the front end, the backend, socket I/O, the reactor); a part's
share of the samples times the proxy's CPU an operation (from /proc) is its
cost an operation. For LDAP it also measures ldaptor's bare server
(bench/ldaptor_server.py, accepting every bind) under the same load: what
the proxy adds a bind is what it spends beyond that.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cpu import process_cpu_seconds
from bench.harness import PASSWORD, ROOT, result, start_load
from bench.run import Bench

# Samples of a thread waiting (the reactor in epoll_wait, the pools'
# threads for work) are no CPU: left out.
IDLE = ("Condition.wait", "EPollReactor.doPoll", "Event.wait")


def _poll_line() -> str:
    """Where the daemon's reactor (proxy.reactor) waits in epoll, as py-spy
    names the frame: a sample there waits. The rest of that function is the
    dispatch of events, CPU like any other."""
    from proxy.reactor import Reactor

    lines, first = inspect.getsourcelines(Reactor.doPoll)
    waits = next(i for i, line in enumerate(lines) if "_poller.poll(" in line)
    return f"Reactor.doPoll (proxy/reactor.py:{first + waits})"


POLL = _poll_line()

# The system calls, by the Python function that makes them (py-spy shows no
# C frames): tried on a sample's innermost frame first.
CALLS: list[tuple[str, Any]] = [
    ("send (system call)", lambda f, p: f in ("write_now", "_End.flush", "FileDescriptor.doWrite",
                                              "Connection.writeSomeData", "sendmsg")),
    ("recv (system call)", lambda f, p: f in ("Connection.doRead", "_End.readable", "_End.doRead")),
    ("connect, socket, accept", lambda f, p: f in ("BaseClient.doConnect", "socket.__init__",
                                                   "BaseClient.createInternetSocket",
                                                   "Port.doRead", "socket.accept",
                                                   "_Connecting.start")),
    ("close", lambda f, p: f in ("_SocketCloser._closeSocket", "socket._real_close",
                                 "socket.close", "socket.shutdown")),
    ("epoll registration", lambda f, p: f in ("EPollReactor._add", "EPollReactor._remove")),
    ("hand-off to a thread", lambda f, p: f in ("Condition.notify", "Queue.put")),
]

# (part, test on a frame's function and file); otherwise a sample goes to
# its innermost frame that passes one, tried in this order.
PARTS: list[tuple[str, Any]] = [
    ("HMAC (lookup key)", lambda f, p: f == "lookup_key" or p.endswith("/hmac.py")
     or (f == "AppPasswords.key" and p.endswith("/proxy/auth/apps.py"))),
    ("metrics", lambda f, p: "/prometheus_client/" in p or p.endswith("/proxy/metrics.py")),
    ("audit event (JSON, file)", lambda f, p: p.endswith("/proxy/audit.py")
     or p.endswith("/proxy/daemon/auditing.py")),
    ("log lines", lambda f, p: "/twisted/logger/" in p or "/logging/" in p),
    ("decision (proxy/auth)", lambda f, p: "/proxy/auth/" in p),
    ("session registry", lambda f, p: p.endswith("/proxy/sessions.py")),
    ("BER and IMAP codecs", lambda f, p: "/proxy/wire/" in p),
    ("front end's own Python", lambda f, p: "/proxy/frontends/" in p),
    ("backend's own Python", lambda f, p: "/proxy/backends/" in p),
    ("kernel relay's own Python", lambda f, p: p.endswith("/proxy/splice.py")),
    ("Twisted's TCP transport", lambda f, p: p.endswith("/proxy/transports.py")
     or "/twisted/internet/tcp.py" in p or "/twisted/internet/abstract.py" in p),
    ("Deferreds and coroutines", lambda f, p: p.endswith("/twisted/internet/defer.py")),
    ("reactor (timers, dispatch)", lambda f, p: "/twisted/" in p),
]


def _frame(text: str) -> tuple[str, str]:
    function, _, where = text.partition(" (")
    return function, "/" + where.rsplit(":", 1)[0]  # py-spy's paths are relative


def _part(frames: list[str]) -> str | None:
    leaf = _frame(frames[-1])
    if leaf[0] in IDLE or frames[-1] == POLL:
        return None
    for name, test in CALLS:
        if test(*leaf):
            return name
    for frame in reversed(frames):
        function, path = _frame(frame)
        for name, test in PARTS:
            if test(function, path):
                return name
    return "other"


def attribute(raw: str) -> tuple[collections.Counter, int]:
    """Samples a part, from py-spy's raw (collapsed) output; and the
    samples with CPU (idle ones left out)."""
    parts: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            part = _part(stack.split(";"))
            if part is not None:
                parts[part] += int(count)
    return parts, sum(parts.values())


def sample(pid: int, seconds: float, rate: int, out: Path) -> str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                    "--rate", str(rate), "--format", "raw", "--output", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out.read_text()


def system_calls(kind: str, port: int, credentials: list[tuple[str, str]], pid: int,
                 seconds: float) -> dict[str, float]:
    """System calls of the daemon (every thread) an operation: strace
    counts them over a load of ``seconds`` (it slows the daemon down, not
    the count)."""
    trace = subprocess.Popen(["strace", "-f", "-c", "-q", "-p", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1)  # attached to every thread
    figures = result(start_load(kind, port, credentials, connections=8, seconds=seconds), seconds)
    trace.send_signal(signal.SIGINT)
    _, table = trace.communicate(timeout=30)
    calls = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit():
            calls[fields[-1]] = int(fields[3]) / max(1, figures["operations"])
    return dict(sorted(calls.items(), key=lambda item: -item[1]))


def nginx_system_calls(bench: Bench, kind: str, seconds: float) -> dict[str, float] | None:
    """nginx's worker's system calls a login, under the same load (None
    without nginx)."""
    nginx = bench.peer()
    if nginx is None:
        return None
    worker = next(int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
                  and (entry / "stat").exists()
                  and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                  == nginx.process.pid)
    credentials = [(uid, PASSWORD) for uid in bench.users]
    port = nginx.port if kind == "imap" else nginx.smtp_port
    result(start_load(kind, port, credentials, connections=8, seconds=1), 1)
    return system_calls(kind, port, credentials, worker, seconds)


def under_load(kind: str, port: int, credentials: list[tuple[str, str]], pid: int,
               seconds: float) -> tuple[float, dict[str, Any]]:
    """CPU ms an operation of process ``pid`` over ``seconds`` of load."""
    load = start_load(kind, port, credentials, connections=8, seconds=seconds)
    before = process_cpu_seconds(pid)
    figures = result(load, seconds)
    return (process_cpu_seconds(pid) - before) * 1000 / max(1, figures["operations"]), figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("imap", "smtp", "ldap"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=100, help="py-spy's samples a second")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks in this file")
    parser.add_argument("--strace", action="store_true",
                        help="also count the daemon's system calls an operation (strace -c)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lap-profile-"))
    bench = Bench(folder, args.seconds, 1, users=8)  # 8 clients, one user each
    report: dict[str, Any] = {"kind": args.kind}
    try:
        bench.start()
        daemon = bench.proxy("proxy")
        try:
            credentials = [(uid, daemon.secrets[uid]) for uid in bench.users]
            port = daemon.ports[args.kind]
            pid = daemon.process.pid
            result(start_load(args.kind, port, credentials, connections=8, seconds=2), 2)
            cpu_ms, figures = under_load(args.kind, port, credentials, pid, args.seconds)
            load = start_load(args.kind, port, credentials, connections=8,
                              seconds=args.seconds + 2)
            time.sleep(1)
            raw = sample(pid, args.seconds, args.rate, folder / "raw.txt")
            if args.raw is not None:
                args.raw.write_text(raw)
            parts, total = attribute(raw)
            result(load, args.seconds + 2)
            if args.strace:
                report["system_calls"] = system_calls(args.kind, port, credentials, pid,
                                                      args.seconds)
            report.update(proxy_cpu_ms=cpu_ms, rate=figures["rate"], samples=total, parts={
                name: {"share": count / total, "us": count / total * cpu_ms * 1000}
                for name, count in parts.most_common()})
        finally:
            daemon.stop()
        if args.strace and args.kind != "ldap":
            report["nginx_system_calls"] = nginx_system_calls(bench, args.kind, args.seconds)
        if args.kind == "ldap":
            bare = subprocess.Popen([sys.executable, "-m", "bench.ldaptor_server"],
                                    stdout=subprocess.PIPE, text=True, cwd=ROOT)
            try:
                port = int(bare.stdout.readline())
                direct = [(bench.slapd.user_dn(uid), PASSWORD) for uid in bench.users]
                result(start_load("ldap", port, direct, connections=8, seconds=2), 2)
                report["ldaptor_cpu_ms"], figures = under_load("ldap", port, direct, bare.pid,
                                                               args.seconds)
                report["ldaptor_rate"] = figures["rate"]
            finally:
                bare.terminate()
                bare.wait()
    finally:
        bench.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(report, indent=1))
    print(f"\nproxy: {report['proxy_cpu_ms'] * 1000:.0f} µs CPU a {args.kind} operation "
          f"at {report['rate']:.0f}/s ({report['samples']} samples)")
    if "ldaptor_cpu_ms" in report:
        print(f"ldaptor's bare server: {report['ldaptor_cpu_ms'] * 1000:.0f} µs a bind "
              f"at {report['ldaptor_rate']:.0f}/s")
    if "system_calls" in report:
        print("system calls an operation: " + ", ".join(
            f"{name} {count:.1f}" for name, count in report["system_calls"].items()
            if count >= 0.05))
    if report.get("nginx_system_calls"):
        print("nginx's system calls a login: " + ", ".join(
            f"{name} {count:.1f}" for name, count in report["nginx_system_calls"].items()
            if count >= 0.05))
    print("| part | share | µs an operation |\n| --- | --- | --- |")
    for name, part in report["parts"].items():
        print(f"| {name} | {part['share']:.0%} | {part['us']:.0f} |")


if __name__ == "__main__":
    main()
