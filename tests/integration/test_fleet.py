"""A fleet: two daemons sharing one real PostgreSQL store, behind a real
HAProxy (config/haproxy.cfg, as shipped) sending PROXY v2 headers, in front
of the real slapd and Dovecot. Clients connect to HAProxy from 127.0.0.2;
HAProxy reaches the nodes (127.0.0.11 and 127.0.0.12) from 127.0.0.1."""

from __future__ import annotations

import imaplib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from proxy.daemon.health import STORE_SILENCE
from tests.conftest import audit_text, ended, require_tool, wait_until
from tests.integration.conftest import PRIMARY
from tests.proxyd import ProxyDaemon, free_port, mail_backend

ROOT = Path(__file__).resolve().parents[2]
CLIENT = "127.0.0.2"
NODES = {"a": "127.0.0.11", "b": "127.0.0.12"}
PROTOCOL_PORTS = ("IMAP", "IMAPS", "POP3", "POP3S", "SUBMISSION", "SUBMISSIONS", "LDAP", "LDAPS")


class HAProxy:
    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [require_tool("haproxy"), "-db", "-f", str(ROOT / "config" / "haproxy.cfg")],
            env={**os.environ, **self.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, cwd=self.folder)
        port = int(self.env["LAP_IMAP_PORT"])
        if not wait_until(lambda: _connects("127.0.0.1", port) or self.process.poll() is not None,
                          timeout=15) or self.process.poll() is not None:
            self.process.kill()
            raise AssertionError("HAProxy did not start:\n" + self.process.communicate()[0])

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


class IMAP(imaplib.IMAP4):
    """An IMAP client connecting from 127.0.0.2, as a client elsewhere would."""

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(CLIENT, 0))


@pytest.fixture(scope="module")
def fleet(slapd, dovecot, postgres, tmp_path_factory):
    require_tool("haproxy")
    folder = tmp_path_factory.mktemp("fleet")
    database = postgres.create_database("fleet")
    password_file = postgres.password_file(folder)
    env = {f"LAP_{name}_PORT": str(free_port()) for name in PROTOCOL_PORTS}
    env.update(LAP_HEALTH_PORT=str(free_port()), LAP_BIND="127.0.0.1",
               LAP_NODE_A=NODES["a"], LAP_NODE_B=NODES["b"])
    nodes = {}
    for name, address in NODES.items():
        node_folder = folder / name
        node_folder.mkdir()
        if name == "b":  # every node holds the same pepper
            shutil.copy(folder / "a" / "pepper", node_folder / "pepper")
            (node_folder / "pepper").chmod(0o600)
        backend = mail_backend(node_folder, dovecot, "imap")
        node = ProxyDaemon(
            node_folder, slapd,
            {"imap": dict(backend, proxy_protocol=True, trusted_proxies=["127.0.0.1/32"])},
            interface=address, ports={"imap": int(env["LAP_IMAP_PORT"])},
            store=f"  url: {database}\n  password_file: {password_file}\n  timeout: 3s",
            throttle="  source_delay: 0.01\n  source_delay_max: 0.01\n  account_failures: 4\n"
                     "  lockout: 10m",
            cache="  last_used_interval: 1s",
            extra=f"metrics:\n  endpoint: tcp:{env['LAP_HEALTH_PORT']}:interface={address}\n")
        node.config_address, node.health_port = address, int(env["LAP_HEALTH_PORT"])
        node.start()
        nodes[name] = node
    balancer = HAProxy(folder, env)
    balancer.start()
    yield nodes, balancer, int(env["LAP_IMAP_PORT"])
    balancer.stop()
    for node in nodes.values():
        assert node.stop() == 0


_trusted: list[Path] = []


@pytest.fixture(autouse=True)
def _trust(fleet):
    # Each node has its own test CA: trust both.
    _trusted[:] = [node.pki.ca_file for node in fleet[0].values()]


def connect(port: int) -> IMAP:
    context = ssl.create_default_context()
    for ca in _trusted:
        context.load_verify_locations(cafile=str(ca))
    client = IMAP("127.0.0.1", port, timeout=30)
    client.starttls(context)
    return client


def login(port: int, user: str, secret: str) -> IMAP | None:
    client = connect(port)
    try:
        client.login(user, secret)
    except imaplib.IMAP4.error:
        client.shutdown()
        return None
    return client


def audit(node: ProxyDaemon) -> list[dict]:
    return [json.loads(line) for line in audit_text(node.folder / "audit.log").splitlines()]


def feed_position(node: ProxyDaemon) -> int:
    """The last change of the store's feed ``node`` has applied, from its metrics."""
    with urllib.request.urlopen(
            f"http://{node.config_address}:{node.health_port}/metrics") as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("legacy_auth_proxy_change_feed_position "):
                return int(float(line.split()[1]))
    raise AssertionError("no change_feed_position in the metrics")


def caught_up(nodes, postgres) -> bool:
    """Whether every node has applied every change the store holds now."""
    import psycopg

    with psycopg.connect(postgres.url("fleet"), password=postgres.password) as conn:
        last = conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
    return wait_until(lambda: all(feed_position(n) >= last for n in nodes.values()), timeout=10)


def served_by(nodes, user: str) -> list[str]:
    """The nodes that accepted a sign-in of ``user``, one entry a sign-in."""
    return [name for name, node in nodes.items() for e in audit(node)
            if e["event"] == "authentication" and e.get("user") == user
            and e["outcome"] == "accepted"]


def test_one_store_behind_one_balancer(fleet, slapd, dovecot, unique):
    nodes, _, port = fleet
    uid = unique("fleet")
    slapd.add_user(uid, PRIMARY)
    since = len(dovecot.log_text())
    secret = nodes["a"].create_app_password(uid, "phone")  # on node A
    # It logs in through the balancer, on either node.
    for _ in range(6):
        client = login(port, uid, secret)
        assert client is not None
        client.logout()
    assert set(served_by(nodes, uid)) == {"a", "b"}
    # Every node saw the real client, and told Dovecot.
    for node in nodes.values():
        assert all(e["client_address"] == CLIENT for e in audit(node)
                   if e.get("user") == uid and e["event"] == "authentication")
    dovecot.wait_for_log(rf"imap-login: Info: Login: user=<{uid}>.*rip=127\.0\.0\.2, ",
                         since=since)


def test_a_deletion_on_one_node_ends_a_session_on_the_other_within_a_second(fleet, slapd, unique):
    nodes, _, port = fleet
    uid = unique("fleet")
    slapd.add_user(uid, PRIMARY)
    secret = nodes["a"].create_app_password(uid, "laptop")
    client = login(port, uid, secret)
    assert client is not None and client.select("INBOX")[0] == "OK"
    holder = served_by(nodes, uid)[-1]
    other = "b" if holder == "a" else "a"
    done = nodes[other].cli("app-password", "delete", uid, "laptop")
    assert done.returncode == 0, done.stderr
    # From the deletion, committed when the command returns (the command's
    # own start, a Python process on a busy machine, is not the fleet's time).
    started = time.monotonic()
    after = None
    while time.monotonic() - started < 3:
        try:
            client.noop()
        except (imaplib.IMAP4.abort, OSError):
            after = time.monotonic() - started
            break
        time.sleep(0.02)
    assert after is not None and after < 1.0, after
    assert login(port, uid, secret) is None


def test_failures_spread_over_both_nodes_lock_the_account(fleet, slapd, postgres, unique):
    nodes, _, port = fleet
    uid = unique("fleet")
    slapd.add_user(uid, PRIMARY)
    secret = nodes["a"].create_app_password(uid, "tablet")
    for wrong in ("wrong-1", "wrong-2", "wrong-3", "wrong-4"):  # account_failures: 4
        assert login(port, uid, wrong) is None
    refused = {name for name, node in nodes.items() for e in audit(node)
               if e.get("user") == uid and e.get("reason") == "wrong_secret"}
    assert refused == {"a", "b"}  # spread over both
    assert caught_up(nodes, postgres)  # the lockout reaches the other node through the feed
    for _ in range(4):
        assert login(port, uid, secret) is None
    locked = {name for name, node in nodes.items() for e in audit(node)
              if e.get("user") == uid and e.get("reason") == "locked_out"}
    assert locked == {"a", "b"}
    assert nodes["b"].cli("user", "unlock", uid).returncode == 0
    assert caught_up(nodes, postgres)
    for _ in range(2):
        client = login(port, uid, secret)
        assert client is not None
        client.logout()


def test_a_connection_not_from_the_balancer_is_closed_unread(fleet):
    nodes, _, port = fleet
    with socket.create_connection((NODES["a"], port), timeout=5,
                                  source_address=(CLIENT, 0)) as s:
        s.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.11 1 143\r\na1 CAPABILITY\r\n")
        try:
            answer = s.recv(100)
        except ConnectionResetError:  # closed with what was sent unread
            answer = b""
        assert answer == b""  # no greeting


def test_the_fleet_rides_out_a_database_restart(fleet, postgres, slapd, unique):
    nodes, _, port = fleet
    uid = unique("fleet")
    slapd.add_user(uid, PRIMARY)
    cached = nodes["a"].create_app_password(uid, "cached")
    unseen = nodes["a"].create_app_password(uid, "unseen")
    for _ in range(4):  # the success caches of both nodes hold it
        client = login(port, uid, cached)
        assert client is not None
        client.logout()
    stopped = time.monotonic()  # the store was last heard before this
    postgres.stop()
    try:
        for _ in range(4):  # cached app passwords go on
            client = login(port, uid, cached)
            assert client is not None
            client.logout()
        # Others get the protocol's temporary failure, not a refusal.
        client = connect(port)
        with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
            client.login(uid, unseen)
        client.shutdown()
        done = nodes["b"].cli("app-password", "create", uid, "--name", "during")
        # One line, at once, exit 75 (EX_TEMPFAIL): try again later.
        assert done.returncode == 75, done.stderr
        assert done.stderr.strip().count("\n") == 0 and "psycopg" not in done.stderr
        assert "the store cannot be reached" in done.stderr and "temporary" in done.stderr
        # The nodes stay in the balancer (the outage is all of theirs), and
        # cached sign-ins still get through it. Staying is a state held, not
        # an event: asked every half second until the silence that takes a
        # node with a store of its own out (STORE_SILENCE) has surely passed.
        while True:
            for node in nodes.values():
                with urllib.request.urlopen(
                        f"http://{node.config_address}:{node.health_port}/health/ready") as answer:
                    assert answer.read() == b"ok\n"
            if time.monotonic() > stopped + STORE_SILENCE + 1:
                break
            time.sleep(0.5)
        client = login(port, uid, cached)
        assert client is not None
        client.logout()
    finally:
        postgres.start()
    # Each node recovers by itself: the feed is heard again, and what the
    # outage held back works.
    for node in nodes.values():
        assert wait_until(lambda: node.log().count("change feed: announced by the store") >= 2,
                   timeout=30)
    client = login(port, uid, unseen)
    assert client is not None
    client.logout()
    # Every use, those during the outage too, is in the store once it answers.
    def uses_written():
        listed = json.loads(nodes["a"].cli("app-password", "list", uid, "--json").stdout)
        counts = {a["name"]: a["use_count"] for a in listed}
        accepted = [e for node in nodes.values() for e in audit(node)
                    if e["event"] == "authentication" and e.get("user") == uid
                    and e["outcome"] == "accepted" and e.get("app_password_name") == "cached"]
        return counts.get("cached") == len(accepted) == 9
    assert wait_until(uses_written, 15)
    holder = served_by(nodes, uid)[-1]
    client = login(port, uid, cached)
    assert client is not None and client.select("INBOX")[0] == "OK"
    holder = served_by(nodes, uid)[-1]
    other = "b" if holder == "a" else "a"
    assert nodes[other].cli("app-password", "delete", uid, "cached").returncode == 0
    assert wait_until(lambda: ended(client), timeout=2)


def test_two_processes_serve_one_port_and_share_the_lockouts(slapd, dovecot, unique, tmp_path):
    """SO_REUSEPORT: two processes of one host on one port and one SQLite
    store, the kernel spreading connections; failures counted in the store."""
    port = free_port()
    backend = mail_backend(tmp_path, dovecot, "imap")
    settings = {"imap": dict(backend, tls="none", allow_plaintext_auth=True, reuse_port=True)}
    throttle = ("  source_delay: 0.01\n  source_delay_max: 0.01\n  account_failures: 4\n"
                "  lockout: 10m\n  shared: true")
    processes = []
    try:
        for _ in range(2):  # one folder, one config, one store
            daemon = ProxyDaemon(tmp_path, slapd, settings, ports={"imap": port}, throttle=throttle)
            daemon.start()
            processes.append(daemon)
        uid = unique("cores")
        slapd.add_user(uid, PRIMARY)
        secret = processes[0].create_app_password(uid, "phone")

        def plain_login(password: str) -> bool:
            client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
            try:
                client.login(uid, password)
            except imaplib.IMAP4.error:
                return False
            finally:
                client.shutdown()
            return True

        for _ in range(12):
            assert plain_login(secret)
        assert plain_login("wrong-0") is False
        served = [d.log().count(f"user={uid} ") for d in processes]
        # The kernel picks a process for each connection by a hash of its
        # addresses: eight in a row went to one of two, 1 time in 128.
        for n in range(1, 40):
            assert plain_login(f"wrong-{n}") is False
            served = [d.log().count(f"user={uid} ") for d in processes]
            if all(served) and sum(served) >= 4:
                break
        assert all(served), served  # both processes took connections
        # SQLite has no NOTIFY: each process reads the feed each second.
        for daemon in processes:
            daemon.wait_for(f"{uid} is locked out by failures counted in the shared store")
        assert not any(plain_login(secret) for _ in range(4))  # locked in both
    finally:
        for daemon in processes:
            daemon.stop()
