"""``workers: 2``: the real daemon as one supervisor and two worker
processes on one SQLite store, in front of the real slapd and Dovecot,
driven by imaplib and ldap3: both workers serve, a lockout and a
revocation made through one hold on both, a worker killed with SIGKILL
under load is started again and only the connections it held fail, SIGHUP
reloads every worker, SIGTERM stops them all, and /metrics sums them."""

from __future__ import annotations

import imaplib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import ldap3
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import audit_text, ended, require_tool, wait_until
from tests.integration.conftest import PRIMARY
from tests.proxyd import Output, ProxyDaemon, free_port, mail_backend


@pytest.fixture(scope="module")
def proxy(slapd, dovecot, tmp_path_factory):
    folder = tmp_path_factory.mktemp("workers")
    metrics_port = free_port()
    daemon = ProxyDaemon(folder, slapd, {
        "imap": dict(mail_backend(folder, dovecot, "imap"), tls="none",
                     allow_plaintext_auth=True, max_connections_per_source=200),
        "ldap": {"protocol": "ldap", "realm": "cloud", "tls": "none",
                 "allow_plaintext_auth": True, "max_connections_per_source": 200},
    }, workers=2, throttle="  source_delay: 0.01\n  source_delay_max: 0.01\n"
                           "  account_failures: 4\n  lockout: 10m",
        # Its tests hold many sessions of one user from one address until
        # both workers have some: the one accept queue may give the first
        # dozen to one worker, past the default cap of 10 (per worker).
        extra=f"metrics:\n  endpoint: tcp:{metrics_port}:interface=127.0.0.1\n"
              "limits:\n  max_sessions_per_user_and_source: 100\n")
    daemon.metrics_port = metrics_port
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def imap(proxy, port_name: str = "imap") -> imaplib.IMAP4:
    return imaplib.IMAP4("127.0.0.1", proxy.ports[port_name], timeout=30)


def imap_login(proxy, uid: str, secret: str) -> bool:
    client = imap(proxy)
    try:
        client.login(uid, secret)
    except imaplib.IMAP4.error:
        return False
    finally:
        client.shutdown()
    return True


def ldap_bind(proxy, uid: str, secret: str) -> bool:
    server = ldap3.Server("127.0.0.1", port=proxy.ports["ldap"], get_info=ldap3.NONE,
                          connect_timeout=10)
    conn = ldap3.Connection(server, user=uid, password=secret, receive_timeout=15,
                            raise_exceptions=False)
    try:
        return bool(conn.bind())
    finally:
        conn.unbind()


def http_unix(path: str, what: str) -> str:
    """GET ``what`` from a worker's own metrics socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(f"GET {what} HTTP/1.0\r\nHost: worker\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def worker_metrics(proxy) -> dict[int, str]:
    """Each worker's own /metrics text, by index."""
    texts = {}
    for index, (_, role) in proxy.worker_roles().items():
        path = role["metrics"].split(":")[1]
        texts[index] = http_unix(path, "/metrics")
    return texts


def supervisor_metrics(proxy) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics",
                                timeout=20) as answer:
        return answer.read().decode()


def value(text: str, sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` whose labels include ``labels``."""
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == sample and labels.items() <= s.labels.items())


SIGN_INS = "legacy_auth_proxy_sign_ins_total"


def both_workers_serve(proxy, uid: str, secret: str, port_name: str = "imap") -> bool:
    """IMAP logins on ``port_name``, one after another, until each of the
    two workers has accepted one (at most 100)."""
    served = set()
    for _ in range(100):
        client = imap(proxy, port_name)
        client.login(uid, secret)
        client.logout()
        for index, text in worker_metrics(proxy).items():
            if value(text, SIGN_INS, protocol="imap", outcome="accepted"):
                served.add(index)
        if served == {0, 1}:
            return True
    return False


def test_both_workers_serve_imap_logins_and_ldap_binds(proxy, slapd, unique):
    uid = unique("w")
    slapd.add_user(uid, PRIMARY)
    secret = proxy.create_app_password(uid, "phone")
    assert ldap_bind(proxy, uid, secret)
    for _ in range(100):
        assert imap_login(proxy, uid, secret)
        assert ldap_bind(proxy, uid, secret)
        per_worker = {i: (value(t, SIGN_INS, protocol="imap", outcome="accepted"),
                          value(t, SIGN_INS, protocol="ldap", outcome="accepted"))
                      for i, t in worker_metrics(proxy).items()}
        if len(per_worker) == 2 and all(imap_n and ldap_n for imap_n, ldap_n in per_worker.values()):
            break
    else:
        raise AssertionError(f"not both workers served: {per_worker}")


def test_metrics_are_the_sum_of_every_workers(proxy, slapd, unique):
    uid = unique("w")
    slapd.add_user(uid, PRIMARY)
    secret = proxy.create_app_password(uid, "phone")
    for _ in range(6):
        assert imap_login(proxy, uid, secret)
    # Nothing else signs in meanwhile: the sum of the parts, read before and
    # after the whole, is the whole.
    before = sum(value(t, SIGN_INS) for t in worker_metrics(proxy).values())
    whole = supervisor_metrics(proxy)
    after = sum(value(t, SIGN_INS) for t in worker_metrics(proxy).values())
    assert before == value(whole, SIGN_INS) == after > 0
    assert value(whole, "legacy_auth_proxy_workers") == 2
    assert value(whole, "legacy_auth_proxy_ready") == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/health/ready",
                                timeout=20) as answer:
        assert answer.read() == b"ok\n"


def test_a_lockout_made_through_one_worker_holds_on_all(proxy, slapd, unique):
    uid = unique("w")
    slapd.add_user(uid, PRIMARY)
    secret = proxy.create_app_password(uid, "phone")
    # Never signed in from here: the failures count against strangers' place
    # (a familiar place has counters of its own).
    for n in range(4):
        assert not imap_login(proxy, uid, f"wrong-secret-{n}")
    # Locked on every worker: each refuses the right app password, over
    # IMAP and LDAP alike, once the store's change feed reached it.
    refused = {i: value(t, SIGN_INS, outcome="refused", reason="locked_out")
               for i, t in worker_metrics(proxy).items()}

    def locked_everywhere() -> bool:
        if imap_login(proxy, uid, secret) or ldap_bind(proxy, uid, secret):
            return False
        now = {i: value(t, SIGN_INS, outcome="refused", reason="locked_out")
               for i, t in worker_metrics(proxy).items()}
        return all(now[i] > refused.get(i, 0) for i in now)

    assert wait_until(locked_everywhere, 60)
    assert not any(imap_login(proxy, uid, secret) for _ in range(6))


def test_a_revoked_app_password_closes_its_sessions_on_every_worker(proxy, slapd, unique):
    uid = unique("w")
    slapd.add_user(uid, PRIMARY)
    secret = proxy.create_app_password(uid, "phone")
    other = proxy.create_app_password(uid, "laptop")
    sessions = []
    for _ in range(40):
        client = imap(proxy)
        client.login(uid, secret)
        client.select("INBOX")
        sessions.append(client)
        held = [value(t, "legacy_auth_proxy_sessions") for t in worker_metrics(proxy).values()]
        if len(sessions) >= 4 and len(held) == 2 and all(held):
            break
    else:
        raise AssertionError("the sessions did not reach both workers")
    kept = imap(proxy)
    kept.login(uid, other)
    assert proxy.cli("app-password", "delete", uid, "phone").returncode == 0

    assert wait_until(lambda: all(ended(c) for c in sessions), 30)
    assert kept.noop()[0] == "OK"  # another app password's session goes on
    kept.logout()
    assert not imap_login(proxy, uid, secret)


def test_a_worker_killed_under_load_is_started_again_and_only_its_connections_fail(
        proxy, slapd, unique):
    uid = unique("w")
    slapd.add_user(uid, PRIMARY)
    secret = proxy.create_app_password(uid, "phone")
    # Sessions held open, on both workers: those of the killed one end.
    held: list[imaplib.IMAP4] = []
    for _ in range(40):
        client = imap(proxy)
        client.login(uid, secret)
        held.append(client)
        counts = {i: value(t, "legacy_auth_proxy_sessions", listener="imap")
                  for i, t in worker_metrics(proxy).items()}
        if len(held) >= 4 and len(counts) == 2 and all(counts.values()):
            break
    else:
        raise AssertionError("the sessions did not reach both workers")
    roles = proxy.worker_roles()
    victim_pid = roles[1][0]
    held_by_victim = int(counts[1])

    # The load: four clients signing in, selecting and logging out in a loop.
    stop = threading.Event()
    results: list[tuple[float, float, str | None]] = []  # (began, ended, error)
    lock = threading.Lock()

    def load() -> None:
        while not stop.is_set():
            began = time.monotonic()
            error = None
            try:
                client = imap(proxy)
                client.login(uid, secret)
                client.select("INBOX")
                client.logout()
            except Exception as e:  # noqa: BLE001 - what failed is what is counted
                error = f"{type(e).__name__}: {e}"
            with lock:
                results.append((began, time.monotonic(), error))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        assert wait_until(lambda: len(results) >= 20, 60)
        killed_at = time.monotonic()
        os.kill(victim_pid, signal.SIGKILL)
        proxy.wait_for(r"worker 1 died \(signal 9\): starting it again", 30)

        def restarted() -> bool:
            now = proxy.worker_roles()
            return len(now) == 2 and now[1][0] != victim_pid
        assert wait_until(restarted, 60)
        proxy.wait_for("worker 1 started again, ready", 60)
        after = len(results)
        assert wait_until(lambda: len(results) >= after + 20, 90)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    failures = [r for r in results if r[2] is not None]
    print(f"\nkill -9 under load: {len(results)} sign-ins, {len(failures)} failed "
          f"(in flight at the kill), {held_by_victim} of {len(held)} held sessions on the killed "
          f"worker")
    # Only what the killed worker held fails: at most one sign-in a client
    # had in flight when it died, none begun after, and its held sessions.
    assert len(failures) <= len(threads), failures
    assert all(began < killed_at for began, _, _ in failures), failures
    assert sum(1 for r in results if r[2] is None and r[0] > killed_at) >= 20

    gone = [ended(c) for c in held]
    assert sum(gone) == held_by_victim, (gone, held_by_victim)
    whole = supervisor_metrics(proxy)
    assert value(whole, "legacy_auth_proxy_worker_restarts_total") == 1
    assert value(whole, "legacy_auth_proxy_workers") == 2
    # Two processes appended to one audit file, one of them killed: whole lines.
    import json

    for line in audit_text(proxy.folder / "audit.log").splitlines():
        json.loads(line)


def test_sighup_reloads_every_worker(proxy):
    before = proxy.log().count("config reloaded from")
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for("every worker reloaded", 60)
    assert wait_until(lambda: proxy.log().count("config reloaded from") == before + 2, 30), \
        proxy.log()[-3000:]


def test_sigterm_stops_every_worker(slapd, dovecot, tmp_path, unique):
    daemon = ProxyDaemon(tmp_path, slapd, {
        "imap": dict(mail_backend(tmp_path, dovecot, "imap"), tls="none",
                     allow_plaintext_auth=True)}, workers=2)
    daemon.start()
    try:
        pids = [pid for pid, _ in daemon.worker_roles().values()]
        assert len(pids) == 2
        uid = unique("w")
        slapd.add_user(uid, PRIMARY)
        secret = daemon.create_app_password(uid, "phone")
        session = imap(daemon)
        session.login(uid, secret)
    finally:
        code = daemon.stop()
    assert code == 0
    log = daemon.log()
    assert log.count("SIGTERM received, stopping") == 2  # each worker, told once
    assert "stopping every worker (SIGTERM received)" in log
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", daemon.ports["imap"]), timeout=5).close()


def test_systemd_hears_the_supervisor_alone(slapd, dovecot, tmp_path):
    """READY=1 once every worker is ready, RELOADING=1 and READY=1 around a
    reload of all, STOPPING=1, and the watchdog's pings: all from the
    supervisor (the workers tell it, not systemd: NotifyAccess=main)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notify.settimeout(60)
    daemon = ProxyDaemon(tmp_path, slapd, {
        "imap": dict(mail_backend(tmp_path, dovecot, "imap"), tls="none",
                     allow_plaintext_auth=True)}, workers=2)
    heard: list[tuple[int, str]] = []

    def hear(until: str) -> None:
        while True:
            data, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = next(int.from_bytes(d[:4], "little") for level, kind, d in ancillary
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            heard.append((pid, data.decode()))
            if data.decode().startswith(until):
                return

    try:
        daemon.start(env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"),
                          "WATCHDOG_USEC": "2000000"})
        hear("READY=1")
        assert len(daemon.worker_roles()) == 2
        daemon.process.send_signal(signal.SIGHUP)
        hear("RELOADING=1")
        hear("READY=1")
        hear("WATCHDOG=1")
    finally:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            hear("STOPPING=1")
        finally:
            assert daemon.stop() == 0
            notify.close()
    assert {pid for pid, _ in heard} == {daemon.process.pid}
    messages = [m for _, m in heard if m != "WATCHDOG=1"]
    assert messages == ["READY=1\nSTATUS=2 workers", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_a_listener_added_by_a_reload_is_served_by_every_worker(slapd, dovecot, tmp_path, unique):
    daemon = ProxyDaemon(tmp_path, slapd, {
        "imap": dict(mail_backend(tmp_path, dovecot, "imap"), tls="none",
                     allow_plaintext_auth=True)}, workers=2)
    daemon.start()
    try:
        uid = unique("w")
        slapd.add_user(uid, PRIMARY)
        secret = daemon.create_app_password(uid, "phone")
        port = free_port()
        text = daemon.config.read_text()
        added = text.replace("listeners:\n", "listeners:\n  - name: added\n"
                             f"    endpoint: tcp:{port}:interface=127.0.0.1\n"
                             "    tls: none\n    allow_plaintext_auth: true\n"
                             + "".join(f"    {k}: \"{v}\"\n" for k, v in
                                       mail_backend(tmp_path, dovecot, "imap").items()), 1)
        daemon.config.write_text(added)
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("every worker reloaded", 60)
        assert daemon.log().count("listening: added") == 2  # each worker, SO_REUSEPORT
        daemon.ports["added"] = port
        assert both_workers_serve(daemon, uid, secret, "added")
    finally:
        assert daemon.stop() == 0


def test_socket_activation_hands_systemds_socket_to_every_worker(slapd, dovecot, tmp_path,
                                                                   unique):
    activate = require_tool("systemd-socket-activate")
    port = free_port()
    daemon = ProxyDaemon(tmp_path, slapd, {
        "imap": dict(mail_backend(tmp_path, dovecot, "imap"), tls="none",
                     allow_plaintext_auth=True)}, workers=2)
    daemon.config.write_text(daemon.config.read_text().replace(
        f"tcp:{daemon.ports['imap']}:interface=127.0.0.1", "systemd:domain=INET:index=0"))
    uid = unique("w")
    slapd.add_user(uid, PRIMARY)
    secret = daemon.create_app_password(uid, "phone")
    daemon.process = subprocess.Popen(
        [activate, "-l", f"127.0.0.1:{port}", "--fdname=imap", "-E", "PYTHONPATH=" + os.getcwd(),
         sys.executable, "-m", "proxy", "--config", str(daemon.config), "serve"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    daemon.reader = Output(daemon.process)
    daemon.ports["imap"] = port
    try:
        daemon.wait_for("Listening on")
        # The first connection starts the supervisor; it waits in the queue
        # of systemd's socket until a worker takes it.
        first = socket.create_connection(("127.0.0.1", port), timeout=60)
        daemon.wait_for("workers ready", 60)
        assert first.recv(100).startswith(b"* OK")
        first.close()
        assert both_workers_serve(daemon, uid, secret)
    finally:
        assert daemon.stop() == 0, daemon.log()[-3000:]


def test_the_demo_runs_with_workers(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--workers", "2"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    reader = Output(process)
    try:
        reader.wait_for("supervisor: 2 workers ready", 90)
        text = reader.drain()
        secret = re.search(r"^    ([a-z]{4} [a-z]{4} [a-z]{4} [a-z]{4})$", text, re.MULTILINE)[1]
        assert "Served by 2 worker processes" in text
        port = int(re.search(r"imap://127.0.0.1:(\d+)", text)[1])
        ca = tmp_path / "legacy-auth-proxy-demo" / "tls" / "ca.pem"
        for _ in range(4):
            client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
            client.starttls(ssl.create_default_context(cafile=str(ca)))
            assert client.login("demo", secret)[0] == "OK"
            client.logout()
        metrics = re.search(r"(http://127.0.0.1:\d+)/metrics", text)[1]
        with urllib.request.urlopen(metrics + "/metrics", timeout=30) as answer:
            whole = answer.read().decode()
        assert value(whole, "legacy_auth_proxy_workers") == 2
        assert value(whole, SIGN_INS, outcome="accepted") == 4
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: the whole group hears it
        assert process.wait(60) == 0
    log = reader.drain(timeout=10)
    for noise in ("Traceback", "#warn", "#error", "#critical", "starting on", "Port ", "Factory"):
        assert noise not in log, log


def test_the_unit_lets_the_supervisor_handle_stop_and_notify():
    """systemd's SIGTERM reaches the supervisor alone (KillMode=mixed), which
    forwards it once; only the main process may notify (the workers tell the
    supervisor)."""
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[2] / "systemd" / "legacy-auth-proxy.service"
             ).read_text().splitlines()
    for line in ("Type=notify", "NotifyAccess=main", "KillMode=mixed"):
        assert line in lines, line


def test_workers_on_postgresql_share_a_lockout_and_a_revocation(slapd, dovecot, postgres,
                                                                tmp_path, unique):
    """The same through a PostgreSQL store, whose NOTIFY carries the feed."""
    database = postgres.create_database("workers")
    password_file = postgres.password_file(tmp_path)
    daemon = ProxyDaemon(tmp_path, slapd, {
        "imap": dict(mail_backend(tmp_path, dovecot, "imap"), tls="none",
                     allow_plaintext_auth=True, max_connections_per_source=200)},
        workers=2, store=f"  url: {database}\n  password_file: {password_file}\n  timeout: 3s",
        throttle="  source_delay: 0.01\n  source_delay_max: 0.01\n  account_failures: 4\n"
                 "  lockout: 10m")
    daemon.start()
    try:
        uid = unique("w")
        slapd.add_user(uid, PRIMARY)
        secret = daemon.create_app_password(uid, "phone")
        sessions = []
        for _ in range(40):
            client = imap(daemon)
            client.login(uid, secret)
            sessions.append(client)
            held = [value(t, "legacy_auth_proxy_sessions") for t in worker_metrics(daemon).values()]
            if len(sessions) >= 2 and len(held) == 2 and all(held):
                break
        else:
            raise AssertionError("the sessions did not reach both workers")
        assert daemon.cli("app-password", "delete", uid, "phone").returncode == 0

        assert wait_until(lambda: all(ended(c) for c in sessions), 30)
        other = unique("w")
        slapd.add_user(other, PRIMARY)
        secret = daemon.create_app_password(other, "phone")
        for n in range(4):
            assert not imap_login(daemon, other, f"wrong-secret-{n}")
        assert wait_until(lambda: not any(imap_login(daemon, other, secret) for _ in range(6)), 30)
        refusals = [value(t, SIGN_INS, outcome="refused", reason="locked_out")
                    for t in worker_metrics(daemon).values()]
        for _ in range(40):
            if all(refusals):
                break
            assert not imap_login(daemon, other, secret)
            refusals = [value(t, SIGN_INS, outcome="refused", reason="locked_out")
                        for t in worker_metrics(daemon).values()]
        assert all(refusals), refusals  # locked on both workers
    finally:
        assert daemon.stop() == 0


def test_workers_that_cannot_start_stop_the_supervisor_with_their_status(slapd, tmp_path):
    """A worker's exit 78 (here: a listener's certificate that is not there)
    stops the others and the supervisor exits 78, which systemd does not
    restart, as for one process."""
    daemon = ProxyDaemon(tmp_path, slapd, {
        "ldap": {"protocol": "ldap", "realm": "cloud",
                 "certificate": str(tmp_path / "missing.pem")}}, workers=2)
    process = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(daemon.config), "serve"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert process.returncode == 78, process.stdout + process.stderr
    assert "could not start (exit code 78): stopping" in process.stdout
    assert "missing.pem" in process.stderr


def test_a_worker_dying_in_a_loop_makes_the_supervisor_give_up_cleanly(slapd, tmp_path):
    """Killed each time it is started again, six times within two minutes:
    the supervisor stops the other worker and exits 1, leaving no process."""
    daemon = ProxyDaemon(tmp_path, slapd, {
        "ldap": {"protocol": "ldap", "realm": "cloud", "tls": "none",
                 "allow_plaintext_auth": True}}, workers=2)
    daemon.start()
    try:
        other = daemon.worker_roles()[0][0]
        killed: set[int] = set()

        def the_new_one() -> int | None:
            roles = daemon.worker_roles()
            pid = roles[1][0] if 1 in roles else None
            return pid if pid not in killed else None

        # As soon as each is there (ready or not): the deaths come as fast
        # as the supervisor's backoff lets them, well within its window.
        while daemon.process.poll() is None and len(killed) < 12:
            if not wait_until(lambda: the_new_one() is not None
                              or daemon.process.poll() is not None, 60):
                break
            pid = the_new_one()
            if pid is not None:
                killed.add(pid)
                os.kill(pid, signal.SIGKILL)
        assert daemon.process.wait(60) == 1
    finally:
        daemon.stop()
    log = daemon.log()
    assert "worker 1 keeps dying (signal 9): giving up, stopping every worker" in log
    assert len(killed) == 6
    assert not os.path.exists(f"/proc/{other}")


def test_a_listener_removed_by_a_reload_closes_and_a_worker_started_after_serves_the_rest(
        slapd, dovecot, tmp_path, unique):
    backend = mail_backend(tmp_path, dovecot, "imap")
    daemon = ProxyDaemon(tmp_path, slapd, {
        "imap": dict(backend, tls="none", allow_plaintext_auth=True),
        "gone": dict(backend, tls="none", allow_plaintext_auth=True)}, workers=2)
    daemon.start()
    try:
        uid = unique("w")
        slapd.add_user(uid, PRIMARY)
        secret = daemon.create_app_password(uid, "phone")
        text = daemon.config.read_text()
        start = text.index("  - name: gone\n")
        end = text.find("  - name:", start + 1)
        daemon.config.write_text(text[:start] + (text[end:] if end != -1 else ""))
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("every worker reloaded", 60)
        with pytest.raises(OSError):  # closed in every worker and the supervisor
            socket.create_connection(("127.0.0.1", daemon.ports["gone"]), timeout=5).close()
        victim = daemon.worker_roles()[1][0]
        os.kill(victim, signal.SIGKILL)
        daemon.wait_for("worker 1 started again, ready", 90)
        for _ in range(6):
            assert imap_login(daemon, uid, secret)
    finally:
        assert daemon.stop() == 0
