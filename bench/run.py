"""The benchmarks, in one run: the proxy against its physical limits and its
peers, measured side by side on this machine.

    .venv/bin/python -m bench.run [--seconds 5] [--repeat 3]

Starts what it needs on loopback (slapd and Dovecot from Debian's packages,
through the test fixtures; nginx's mail proxy when installed; the proxy
itself as separate processes), runs each scenario ``--repeat`` times, and
writes docs/benchmarks/results.json, docs/benchmarks/results.md and PNG
charts. Every figure is the median of the runs with their min and max;
every comparison is a ratio of figures measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proxy.apppasswords import HashParameters, Hasher, generate

from bench.harness import (BENCH_LIMITS, OUT, PASSWORD, ROOT, cpu_seconds, load, result, rss_kib,
                           start_load, summary)


class Bench:
    def __init__(self, folder: Path, seconds: float, repeat: int, users: int = 64) -> None:
        self.folder = folder
        self.user_count = users
        self.seconds = seconds
        self.repeat = repeat
        self.results: dict[str, Any] = {}
        self.cores = os.cpu_count() or 1

    def start(self) -> None:
        from tests.dovecot import Dovecot
        from tests.slapd import Slapd

        self.slapd = Slapd(self.folder / "slapd")
        self.slapd.start()
        self.dovecot = Dovecot(self.folder / "dovecot")
        self.dovecot.start()
        self.users = [f"bench{i:03d}" for i in range(self.user_count)]
        for uid in self.users:
            self.slapd.add_user(uid, PASSWORD)
            self.dovecot.add_user(uid, PASSWORD)

    def proxy(self, name: str, throttle: str = "  source_delay: 0\n  source_delay_max: 0\n"
              "  account_failures: 10000", **options: Any) -> Any:
        from tests.proxyd import ProxyDaemon, mail_backend

        plain = {"tls": "none", "allow_plaintext_auth": True, "max_connections_per_source": 100000}
        daemon = ProxyDaemon(
            self.folder / name, self.slapd, {
                "ldap": dict(plain, protocol="ldap", realm="cloud"),
                "imap": dict(mail_backend(self.folder, self.dovecot, "imap"), **plain),
                "imaps": dict(mail_backend(self.folder, self.dovecot, "imap"),
                              **dict(plain, tls="implicit")),
                "smtp": dict(mail_backend(self.folder, self.dovecot, "smtp"), **plain),
            },
            hashing="  threads: 0",
            throttle=throttle,
            account_cache="60", extra=BENCH_LIMITS, **options,
        )
        daemon.start()
        daemon.secrets = {uid: daemon.create_app_password(uid, "bench") for uid in self.users}
        return daemon

    def stop(self) -> None:
        for part in ("nginx", "dovecot", "slapd"):
            server = getattr(self, part, None)
            if server is not None:
                server.stop()

    # -- scenarios ------------------------------------------------------------------------

    def measure(self, name: str, runs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        figure = {"rate": summary([r["rate"] for r in runs]),
                  "p99_ms": summary([(r["p99"] or 0) * 1000 for r in runs]),
                  "runs": runs, **extra}
        self.results[name] = figure
        print(f"{name}: {figure['rate']['median']:.0f}/s "
              f"(min {figure['rate']['min']:.0f}, max {figure['rate']['max']:.0f})", flush=True)
        return figure

    def argon2_limit(self) -> dict[str, Any]:
        """What argon2 alone does here: one verify's time on one thread, and
        verifies a second with one thread per core at once (the hashing
        pool's size), which is lower than cores / one verify's time: the
        verifies share the memory bus and the caches."""
        import concurrent.futures

        hasher = Hasher(HashParameters())
        secret = generate()
        encoded = hasher.hash(secret)
        times, limits = [], []

        def verify(count: int) -> None:
            for _ in range(count):
                hasher.verify(encoded, secret)

        with concurrent.futures.ThreadPoolExecutor(self.cores) as pool:
            for _ in range(self.repeat):
                started = time.perf_counter()
                verify(10)
                times.append((time.perf_counter() - started) / 10)
                started = time.perf_counter()
                list(pool.map(verify, [20] * self.cores))
                limits.append(20 * self.cores / (time.perf_counter() - started))
        figure = {"verify_ms": summary([t * 1000 for t in times]),
                  "limit": summary(limits),
                  "cores_over_verify": summary([self.cores / t for t in times])}
        self.results["argon2"] = figure
        return figure

    def cold(self) -> None:
        """1. Cold app-password logins: every bind runs argon2."""
        limit = self.argon2_limit()
        daemon = self.proxy("proxy-cold", cache="  app_password_ttl: 0")
        try:
            credentials = [(uid, daemon.secrets[uid]) for uid in self.users]
            runs = [load("ldap", daemon.ports["ldap"], credentials,
                         connections=self.cores * 4, seconds=self.seconds)
                    for _ in range(self.repeat)]
        finally:
            daemon.stop()
        figure = self.measure("cold_app_password_binds", runs)
        figure["ratio_to_argon2_limit"] = figure["rate"]["median"] / limit["limit"]["median"]

    def wrong(self, daemon: Any) -> None:
        """2. Wrong secrets: CPU per refused attempt, no argon2."""
        wrong = [(uid, generate()) for uid in self.users]
        runs = []
        for _ in range(self.repeat):
            before = cpu_seconds(daemon.process.pid)
            result = load("ldap-wrong", daemon.ports["ldap"], wrong, connections=8,
                          seconds=self.seconds)
            result["proxy_cpu_ms"] = (cpu_seconds(daemon.process.pid) - before) * 1000 / max(
                1, result["operations"])
            runs.append(result)
        figure = self.measure("wrong_secret_binds", runs)
        figure["proxy_cpu_ms_per_attempt"] = summary([r["proxy_cpu_ms"] for r in runs])

    def peer(self) -> Any:
        """nginx's mail proxy in front of the same Dovecot, started once; None
        (said aloud) when it is not installed."""
        from bench.nginx import Nginx, missing

        if getattr(self, "nginx", None) is None:
            why = missing()
            if why is not None:
                print(f"nginx's mail proxy is missing, measured without it: {why}", flush=True)
                return None
            from tests.pki import make_pki

            self.nginx_pki = make_pki(self.folder / "nginx-pki")
            self.nginx = Nginx(self.folder / "nginx", imap_port=self.dovecot.imap_port,
                               submission_port=self.dovecot.submission_port,
                               certificate=(self.nginx_pki.cert_file, self.nginx_pki.key_file))
        return self.nginx

    def warm(self, daemon: Any) -> None:
        """3. Warm logins over IMAP and SMTP: directly to Dovecot, through the
        proxy, through nginx's mail proxy and (IMAP) through Python's floors
        (bench/floor.py), one after the other in every repeat, with the CPU
        each server spent a login (/proc/PID/stat)."""
        from bench import floor

        nginx = self.peer()
        direct = [(uid, PASSWORD) for uid in self.users]
        proxied = [(uid, daemon.secrets[uid]) for uid in self.users]
        dovecot = self.dovecot._process.pid
        with contextlib.ExitStack() as stack:
            floors = {name: stack.enter_context(floor.running(f"imap-{name}",
                                                              self.dovecot.imap_port))
                      for name in ("raw", "twisted")}
            self._warm(daemon, nginx, direct, proxied, dovecot, floors)

    def _warm(self, daemon: Any, nginx: Any, direct: list[tuple[str, str]],
              proxied: list[tuple[str, str]], dovecot: int, floors: dict[str, Any]) -> None:
        from bench.cpu import group_cpu_seconds, process_cpu_seconds

        for kind, backend_port in (("imap", self.dovecot.imap_port),
                                   ("smtp", self.dovecot.submission_port)):
            paths = {"direct": (backend_port, direct, None),
                     "proxy": (daemon.ports[kind], proxied,
                               lambda: process_cpu_seconds(daemon.process.pid))}
            if nginx is not None:
                port = nginx.port if kind == "imap" else nginx.smtp_port
                paths["nginx"] = (port, direct, lambda: group_cpu_seconds(nginx.process.pid))
            if kind == "imap":  # what CPython costs a login at least (bench/floor.py)
                for name, (pid, port) in floors.items():
                    paths[f"floor_{name}"] = (port, direct,
                                              lambda pid=pid: process_cpu_seconds(pid))
            for port, credentials, _ in paths.values():  # fill caches, start processes
                load(kind, port, credentials, connections=8, seconds=1)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
            for _ in range(self.repeat):
                for name, (port, credentials, server_cpu) in paths.items():
                    before = (server_cpu() if server_cpu else 0.0, group_cpu_seconds(dovecot))
                    result = load(kind, port, credentials, connections=8, seconds=self.seconds)
                    done = max(1, result["operations"])
                    if server_cpu is not None:
                        result["server_cpu_ms"] = (server_cpu() - before[0]) * 1000 / done
                    result["dovecot_cpu_ms"] = (group_cpu_seconds(dovecot) - before[1]) * 1000 / done
                    runs[name].append(result)
            for name, values in runs.items():
                figure = self.measure(f"warm_{kind}_{name}", values)
                figure["dovecot_cpu_ms_per_login"] = summary([r["dovecot_cpu_ms"] for r in values])
                if name != "direct":
                    figure["server_cpu_ms_per_login"] = summary([r["server_cpu_ms"] for r in values])
                    # Each repeat's ratio: the two runs of that repeat, side by side.
                    figure["ratios_to_direct"] = [r["rate"] / d["rate"] for r, d in
                                                  zip(values, runs["direct"])]
                    figure["ratio_to_direct"] = summary(figure["ratios_to_direct"])
            proxy = self.results[f"warm_{kind}_proxy"]
            proxy["proxy_cpu_ms_per_login"] = proxy["server_cpu_ms_per_login"]
            if "nginx" in runs:
                proxy["ratios_to_nginx"] = [p["rate"] / n["rate"] for p, n in
                                            zip(runs["proxy"], runs["nginx"])]

    def ldap_binds(self, daemon: Any) -> None:
        """3b. Warm LDAP binds on persistent connections: slapd, the proxy, ldaptor
        and Python's floors (bench/floor.py); each server's CPU a bind."""
        from bench import floor
        from bench.cpu import process_cpu_seconds

        with contextlib.ExitStack() as stack:
            floors = {name: stack.enter_context(floor.running(f"ldap-{name}"))
                      for name in ("raw", "twisted")}
            accept_all = subprocess.Popen([sys.executable, "-m", "bench.ldaptor_server"],
                                          stdout=subprocess.PIPE, text=True, cwd=ROOT)
            stack.callback(accept_all.wait)
            stack.callback(accept_all.terminate)
            port = int(accept_all.stdout.readline())
            direct = [(self.slapd.user_dn(uid), PASSWORD) for uid in self.users]
            proxied = [(uid, daemon.secrets[uid]) for uid in self.users]
            load("ldap", daemon.ports["ldap"], proxied, connections=8, seconds=1)
            servers = {"slapd": (self.slapd.port, direct, self.slapd._process.pid),
                       "proxy": (daemon.ports["ldap"], proxied, daemon.process.pid),
                       "ldaptor": (port, direct, accept_all.pid),
                       **{f"floor_{name}": (floor_port, direct, pid)
                          for name, (pid, floor_port) in floors.items()}}
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
            for _ in range(self.repeat):
                for name, (server_port, credentials, pid) in servers.items():
                    before = process_cpu_seconds(pid)
                    result = load("ldap", server_port, credentials, connections=8,
                                  seconds=self.seconds)
                    result["server_cpu_us"] = (process_cpu_seconds(pid) - before) * 1e6 / max(
                        1, result["operations"])
                    runs[name].append(result)
        for name, values in runs.items():
            figure = self.measure(f"ldap_binds_{name}", values)
            figure["server_cpu_us_per_bind"] = summary([r["server_cpu_us"] for r in values])
        proxy = self.results["ldap_binds_proxy"]
        proxy["ratio_to_slapd"] = proxy["rate"]["median"] / self.results["ldap_binds_slapd"]["rate"]["median"]
        proxy["ratio_to_ldaptor"] = proxy["rate"]["median"] / self.results["ldap_binds_ldaptor"]["rate"]["median"]

    def fairness(self) -> None:
        """4. Warm binds of real users while wrong passwords flood in from 200
        addresses, with the shipped throttling (failure answers delayed per source)."""
        daemon = self.proxy("proxy-fair", throttle="  source_delay: 2s\n  source_delay_max: 15s")
        try:
            self._fairness(daemon)
        finally:
            daemon.stop()

    def _fairness(self, daemon: Any) -> None:
        proxied = [(uid, daemon.secrets[uid]) for uid in self.users[:8]]
        wrong = [(uid, generate()) for uid in self.users[8:]]
        quiet, flooded = [], []
        for _ in range(self.repeat):
            quiet.append(load("ldap", daemon.ports["ldap"], proxied, connections=4,
                              seconds=self.seconds))
            flood = start_load("ldap-wrong", daemon.ports["ldap"], wrong, connections=200,
                               seconds=self.seconds + 2, sources=True)
            time.sleep(1)
            flooded.append(load("ldap", daemon.ports["ldap"], proxied, connections=4,
                                seconds=self.seconds))
            flood_result = result(flood, self.seconds + 2)
            flooded[-1]["flood_rate"] = flood_result["rate"]
        self.measure("fairness_quiet", quiet)
        figure = self.measure("fairness_under_flood", flooded)
        figure["flood_rate"] = summary([r["flood_rate"] for r in flooded])

    def idle(self, sessions: int) -> None:
        """6. Many IMAP sessions in IDLE held through the proxy: memory a session."""

        from tests.proxyd import ProxyDaemon

        import resource

        from bench.idle import raise_file_limit

        raise_file_limit()
        # Each session takes two of the proxy's files (client and backend).
        allowed = (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 1000) // 2
        if sessions > allowed:
            print(f"idle: {sessions} sessions need more open files than allowed here; "
                  f"holding {allowed}", flush=True)
            sessions = allowed
        master = ("bench-master", "bench-master-password")
        backend = subprocess.Popen(
            [sys.executable, "-m", "bench.idle", "backend", ",".join(self.users), *master],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        port = int(backend.stdout.readline())
        secret = self.folder / "idle-master-password"
        secret.write_text(master[1] + "\n")
        secret.chmod(0o600)
        daemon = ProxyDaemon(self.folder / "proxy-idle", self.slapd, {"imap": {
            "protocol": "imap", "realm": "cloud", "tls": "none", "allow_plaintext_auth": True,
            "max_connections_per_source": 1_000_000, "backend": f"imap://127.0.0.1:{port}",
            "backend_login": "dovecot", "pass_client_address": False,
            "master_user": master[0], "master_password_file": str(secret)}},
            hashing="  threads: 0", account_cache="3600", extra=BENCH_LIMITS,
            throttle="  source_delay: 0\n  source_delay_max: 0")
        daemon.start()
        try:
            daemon.secrets = {uid: daemon.create_app_password(uid, "bench") for uid in self.users}
            credentials = [(uid, daemon.secrets[uid]) for uid in self.users]
            load("imap", daemon.ports["imap"], credentials, connections=8, seconds=2)  # warm
            before = rss_kib(daemon.process.pid)
            holder = subprocess.Popen(
                [sys.executable, "-m", "bench.idle", "hold", str(daemon.ports["imap"]),
                 str(sessions), json.dumps(credentials)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            line = holder.stdout.readline()
            if not line.startswith("held"):
                raise RuntimeError(f"holding sessions failed: {line!r}\n{daemon.log()[-3000:]}")
            time.sleep(2)
            after = rss_kib(daemon.process.pid)
            holder.stdin.write("\n")
            holder.stdin.flush()
            figures = json.loads(holder.stdout.readline())
            holder.wait(timeout=120)
        finally:
            daemon.stop()
            backend.terminate()
            backend.wait()
        figures.update(rss_before_kib=before, rss_after_kib=after,
                       kib_per_session=(after - before) / sessions, sessions=sessions)
        self.results["idle_sessions"] = figures
        print(f"idle: {figures['kib_per_session']:.1f} KiB a session, NOOP p99 "
              f"{figures['noop_p99_ms']:.1f} ms", flush=True)

    def relay(self, daemon: Any) -> None:
        """5. One 50 MB message over IMAP: direct, through the proxy, through
        nginx; then with TLS between the client and the proxy or nginx.
        ``relay_repeat`` repeats, the proxy and nginx one right after the
        other, in turns first: each repeat's ratio compares two neighbouring
        fetches, and the report keeps every one (the min, not the best)."""
        import ssl

        from bench.relay import fetch

        user = self.users[0]
        body = b"".join(b"%08d " % i + b"z" * 69 + b"\r\n" for i in range(50 * 1024 * 1024 // 80))
        message = b"Subject: relay\r\n\r\n" + body
        self.dovecot.deliver(user, message)
        nginx = self.peer()
        tls = ssl.create_default_context(cafile=str(daemon.pki.ca_file))
        paths = {"direct": (self.dovecot.imap_port, PASSWORD, None),
                 "proxy": (daemon.ports["imap"], daemon.secrets[user], None),
                 "proxy_tls": (daemon.ports["imaps"], daemon.secrets[user], tls)}
        pairs = [["proxy"], ["proxy_tls"]]
        if nginx is not None:
            nginx_tls = ssl.create_default_context(cafile=str(self.nginx_pki.ca_file))
            paths["nginx"] = (nginx.port, PASSWORD, None)
            paths["nginx_tls"] = (nginx.tls_port, PASSWORD, nginx_tls)
            pairs = [["proxy", "nginx"], ["proxy_tls", "nginx_tls"]]
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for turn in range(self.relay_repeat):
            order = ["direct"] + [name for pair in pairs
                                  for name in (pair if turn % 2 == 0 else pair[::-1])]
            for name in order:
                port, password, context = paths[name]
                received, seconds = fetch(port, user, password, context)
                assert received > len(message), (name, received)
                rates[name].append(received / seconds / 1e6)
        for name, values in rates.items():
            self.results[f"relay_{name}"] = {"mb_per_s": summary(values), "runs": values}
            print(f"relay_{name}: {statistics.median(values):.0f} MB/s "
                  f"(min {min(values):.0f}, max {max(values):.0f})", flush=True)
        for pair in pairs if nginx is not None else []:
            proxy, peer = self.results[f"relay_{pair[0]}"], self.results[f"relay_{pair[1]}"]
            proxy["ratios_to_nginx"] = [p / n for p, n in zip(proxy["runs"], peer["runs"])]
            proxy["ratio_to_nginx"] = summary(proxy["ratios_to_nginx"])

    def fleet(self) -> None:
        """7. The fleet: warm and cold LDAP binds with the SQLite store and
        with PostgreSQL (the shared store); one process against two on one
        port (SO_REUSEPORT) with the same store."""
        from tests.postgres import Postgres
        from tests.proxyd import ProxyDaemon

        postgres = Postgres()
        postgres.init()
        postgres.start()
        try:
            pw = postgres.password_file(self.folder)
            for name in ("sqlite", "postgres"):
                for temperature, cache in (("warm", ""), ("cold", "  app_password_ttl: 0")):
                    store = ""
                    if name == "postgres":
                        url = postgres.create_database(f"bench_{temperature}")
                        store = f"  url: {url}\n  password_file: {pw}"
                    daemon = self.proxy(f"proxy-{name}-{temperature}", store=store, cache=cache)
                    try:
                        credentials = [(uid, daemon.secrets[uid]) for uid in self.users]
                        load("ldap", daemon.ports["ldap"], credentials, connections=8, seconds=1)
                        runs = [load("ldap", daemon.ports["ldap"], credentials,
                                     connections=self.cores * 4, seconds=self.seconds)
                                for _ in range(self.repeat)]
                    finally:
                        daemon.stop()
                    self.measure(f"fleet_{temperature}_binds_{name}", runs)
            for temperature in ("warm", "cold"):
                figure = self.results[f"fleet_{temperature}_binds_postgres"]
                figure["ratio_to_sqlite"] = (figure["rate"]["median"] /
                                             self.results[f"fleet_{temperature}_binds_sqlite"]["rate"]["median"])
            # One process, then two on the same port, one SQLite store.
            for count in (1, 2):
                folder = self.folder / f"proxy-reuse-{count}"
                port = None
                processes = []
                try:
                    for _ in range(count):
                        daemon = ProxyDaemon(
                            folder, self.slapd, {"ldap": {
                                "protocol": "ldap", "realm": "cloud", "tls": "none",
                                "allow_plaintext_auth": True, "reuse_port": True,
                                "max_connections_per_source": 100000}},
                            hashing="  threads: 0", account_cache="60", extra=BENCH_LIMITS,
                            throttle="  source_delay: 0\n  source_delay_max: 0\n"
                                     "  account_failures: 10000",
                            ports={"ldap": port} if port else None)
                        daemon.start()
                        port = daemon.ports["ldap"]
                        processes.append(daemon)
                    secrets_ = {uid: processes[0].create_app_password(uid, "bench")
                                for uid in self.users}
                    credentials = [(uid, secrets_[uid]) for uid in self.users]
                    # New connections for every bind would measure TCP; persistent
                    # ones land on one process each: use many.
                    load("ldap", port, credentials, connections=32, seconds=1)
                    runs = [load("ldap", port, credentials, connections=32,
                                 seconds=self.seconds) for _ in range(self.repeat)]
                finally:
                    for daemon in processes:
                        daemon.stop()
                self.measure(f"fleet_processes_{count}", runs)
            two = self.results["fleet_processes_2"]
            two["ratio_to_one"] = two["rate"]["median"] / self.results["fleet_processes_1"]["rate"]["median"]
        finally:
            postgres.remove()

    def run(self, scenarios: list[str]) -> None:
        self.results["machine"] = {
            "cpu": platform.processor() or platform.machine(), "cores": self.cores,
            "python": platform.python_version(), "system": platform.platform(),
            "seconds_per_run": self.seconds, "runs": self.repeat,
            "load_average_before": os.getloadavg(),
        }
        if "cold" in scenarios:
            self.cold()
        if "fairness" in scenarios:
            self.fairness()
        if "idle" in scenarios:
            self.idle(self.idle_sessions)
        if "fleet" in scenarios:
            self.fleet()
        daemon = self.proxy("proxy")
        try:
            if "wrong" in scenarios:
                self.wrong(daemon)
            if "warm" in scenarios:
                self.warm(daemon)
            if "oauth" in scenarios:
                from bench.oauth import warm_oauth2  # LemonLDAP::NG and an OAuth-only Dovecot

                warm_oauth2(self, daemon)
            if "ldap" in scenarios:
                self.ldap_binds(daemon)
            if "relay" in scenarios:
                self.relay(daemon)
            self.results["proxy_rss_kib"] = rss_kib(daemon.process.pid)
        finally:
            daemon.stop()
            self.results["machine"]["load_average_after"] = os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="cold,wrong,warm,oauth,ldap,fairness,relay,idle,fleet")
    parser.add_argument("--idle-sessions", type=int, default=10_000)
    parser.add_argument("--relay-repeat", type=int, default=9,
                        help="fetches of each relay path (they take a tenth of a second each, "
                             "and the relay's figures move most between runs)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lap-bench-"))
    bench = Bench(folder, args.seconds, args.repeat)
    bench.idle_sessions = args.idle_sessions
    bench.relay_repeat = args.relay_repeat
    try:
        bench.start()
        bench.run(args.only.split(","))
    finally:
        bench.stop()
        shutil.rmtree(folder, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(bench.results, indent=2) + "\n")
    from bench.report import write_report

    write_report(bench.results, OUT)
    print(f"results in {OUT}")


if __name__ == "__main__":
    main()
