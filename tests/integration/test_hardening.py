"""Attacks on the front door, each against the real daemon in front of real
slapd and Dovecot: forged log lines, slow clients that never finish their
login, memory held by unfinished messages, and sessions that must end when
what they were opened with stops being valid."""

from __future__ import annotations

import contextlib
import imaplib
import json
import socket
import subprocess
import time

import pytest

from tests.conftest import audit_text, require_tool, wait_until
from tests.integration.conftest import PRIMARY
from tests.proxyd import ProxyDaemon, mail_backend

LOGIN_TIMEOUT = 3
# The filter documented in docs/configuration.md.
FAILREGEX = (r"\[legacy_auth_proxy\.auth\.failure#\w+\] authentication failure: "
             r"rhost=<HOST> user=\S* protocol=")


@pytest.fixture(scope="module")
def proxy(slapd, dovecot, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy-hardening")
    imap = mail_backend(folder, dovecot, "imap")
    plain = {"tls": "none", "allow_plaintext_auth": True, "login_timeout": LOGIN_TIMEOUT}
    daemon = ProxyDaemon(folder, slapd, {
        "ldap": {"protocol": "ldap", "realm": "cloud", **plain,
                 "max_connections_per_source": 1000},
        "imap": dict(imap, **plain),
        "imaps": dict(imap, tls="implicit"),
        "ldaps": {"protocol": "ldap", "realm": "cloud", "tls": "implicit"},
    })
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


@contextlib.contextmanager
def imaps_daemon(slapd, dovecot, tmp_path, unique, **options):
    """A daemon of its own with an IMAPS listener in front of Dovecot, and a
    directory user with an app password: (daemon, uid, app password)."""
    daemon = ProxyDaemon(tmp_path, slapd, {"imaps": dict(mail_backend(tmp_path, dovecot, "imap"),
                                                         tls="implicit")}, **options)
    daemon.start()
    try:
        uid = unique()
        slapd.add_user(uid, PRIMARY)
        yield daemon, uid, daemon.create_app_password(uid, "phone")
    finally:
        assert daemon.stop() == 0


# -- forged log lines ------------------------------------------------------------------


FORGED = [
    "x authentication failure: rhost=10.9.9.9 user=y protocol=",
    "y rhost=10.9.9.9 user=z",
    "z\tauthentication failure: rhost=10.9.9.9 user=",
    "%20 authentication%20failure:%20rhost=10.9.9.9",
]


def test_a_user_name_cannot_get_someone_else_banned(proxy, tmp_path):
    """Names typed to look like the failure line's own fields: fail2ban, with
    the documented filter, finds only the real client's address."""
    fail2ban_regex = require_tool("fail2ban-regex")
    for name in FORGED:
        client = imaplib.IMAP4("127.0.0.1", proxy.ports["imap"], timeout=30)
        with pytest.raises(imaplib.IMAP4.error):
            client.login('"' + name.replace("\\", "\\\\") + '"', "wrong password")
        client.shutdown()
    done = subprocess.run([require_tool("ldapwhoami"), "-x", "-H",
                           f"ldap://127.0.0.1:{proxy.ports['ldap']}", "-D", FORGED[0],
                           "-w", "wrong"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 49
    assert wait_until(lambda: proxy.log().count("auth.failure") >= len(FORGED) + 1, 10), proxy.log()
    lines = [line for line in proxy.log().splitlines() if "auth.failure" in line]
    log = tmp_path / "proxy.log"
    log.write_text("\n".join(lines) + "\n")
    # The documented filter, and a looser one an operator might write.
    for regex in (FAILREGEX, r"authentication failure: rhost=<HOST> user=\S* protocol="):
        found = subprocess.run([fail2ban_regex, "-o", "ip", str(log), regex],
                               capture_output=True, text=True, timeout=60)
        assert found.returncode == 0, found.stderr
        assert found.stdout.split() == ["127.0.0.1"] * (len(FORGED) + 1), found.stdout


# -- the login deadline ----------------------------------------------------------------


def trickle_until_closed(sock, data: bytes, limit: float) -> bool:
    """Send ``data`` a byte at a time, a byte every 0.2 s, over and over;
    True once the proxy has closed the connection."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
                while sock.recv(4096):
                    pass  # answers, until EOF
                return True
            except socket.timeout:
                continue
            except OSError:
                return True
    return False


@pytest.mark.parametrize("listener,data", [
    ("imap", b"a NOOP\r\n"),
    # An LDAP message's header, then its body a byte at a time (never whole).
    ("ldap", b"\x30\x84\x00\x00\xff\xff" + b"\x02" * 200),
])
def test_the_login_timeout_is_a_deadline_from_connect(proxy, listener, data):
    """A client trickling bytes (complete commands or one unfinished
    message) is still cut off when the login timeout has passed since it
    connected, as Dovecot and Postfix do."""
    sock = socket.create_connection(("127.0.0.1", proxy.ports[listener]), timeout=10)
    started = time.monotonic()
    assert trickle_until_closed(sock, data, LOGIN_TIMEOUT + 15)
    assert time.monotonic() - started >= LOGIN_TIMEOUT - 0.5
    sock.close()


@pytest.mark.integration
def test_a_refused_client_is_read_no_further(proxy):
    """An LDAPS message of 2 GiB is refused at its header; the client then
    pours bytes in. TLS reads on after the goodbye only for the client's
    close alert: a little more, then not at all, so what the client gets
    into the connection is bounded by the sockets' buffers, not by how
    fast it sends until the close deadline (it was 16 MB and more)."""
    import ssl

    context = ssl.create_default_context(cafile=str(proxy.pki.ca_file))
    raw = socket.create_connection(("127.0.0.1", proxy.ports["ldaps"]), timeout=10)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
    sock = context.wrap_socket(raw, server_hostname="localhost")
    sock.sendall(b"\x30\x84\x7f\xff\xff\xff")
    time.sleep(0.2)  # refused: the notice, then the close alert
    sock.setblocking(False)
    junk, sent = b"\x02" * 16384, 0
    until = time.monotonic() + 1.5  # within the close deadline (2 s)
    while time.monotonic() < until:
        try:
            sent += sock.send(junk)
        except (ssl.SSLWantWriteError, BlockingIOError):
            time.sleep(0.01)
        except OSError:
            break
    print(f"the proxy took {sent:,} bytes after refusing")
    assert sent < 8 * 1024 * 1024
    sock.close()


# -- memory before login ------------------------------------------------------------------
# -- memory before login ------------------------------------------------------------------


def closed(sock) -> bool:
    """Whether the proxy closed this non-blocking socket (after what it said)."""
    while True:
        try:
            if sock.recv(65536) == b"":
                return True
        except BlockingIOError:
            return False
        except OSError:
            return True


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


@pytest.fixture(scope="module")
def budgeted(slapd, tmp_path_factory):
    """A daemon whose clients, signed in or not, may hold 8 MiB before login."""
    daemon = ProxyDaemon(tmp_path_factory.mktemp("proxy-budget"), slapd, {
        "ldap": {"protocol": "ldap", "realm": "cloud", "tls": "none",
                 "allow_plaintext_auth": True, "max_connections_per_source": 200},
    }, extra="limits:\n  max_bytes_before_login: 8388608\n"
             "  max_connections_before_login: 1500\n")
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def test_memory_before_login_is_bounded_whatever_the_sources(budgeted, slapd, unique):
    """1,000 connections from ten addresses, each sending most of a 255 KiB
    message and never the rest: the daemon keeps at most its budget, closes
    the connections past it, still answers a real client, and gives the
    memory back when they go."""
    pid = budgeted.process.pid
    port = budgeted.ports["ldap"]
    before = rss_kib(pid)
    header = b"\x30\x83\x03\xfc\x00"  # a SEQUENCE of 261,120 bytes
    sockets = []
    for i in range(1000):
        sock = socket.socket()
        sock.bind((f"127.0.0.{2 + i % 10}", 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        try:
            sock.send(header + b"\x02" * 250_000)
        except BlockingIOError:
            pass
        sockets.append(sock)
    time.sleep(2)
    peak = rss_kib(pid)
    still_open = sum(not closed(sock) for sock in sockets)
    print(f"{still_open} of 1,000 still open; RSS {before} KiB before, {peak} KiB at the peak")
    assert still_open <= 8 * 1024 * 1024 // 250_000 + 1
    assert peak - before < 64 * 1024, f"{before} KiB before, {peak} KiB with 1,000 clients"
    dn = slapd.add_user(unique(), PRIMARY)
    done = subprocess.run([require_tool("ldapwhoami"), "-x", "-H", f"ldap://127.0.0.1:{port}",
                           "-D", dn, "-w", PRIMARY], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for sock in sockets:
        sock.close()
    assert wait_until(lambda: rss_kib(pid) - before < 16 * 1024, 10), \
        f"{before} KiB before, {rss_kib(pid)} KiB after they left"


# -- what an app-password LDAP session reads ------------------------------------------------


def ldap_connection(url_host, port, user, password, use_ssl=False, ca=None):
    import ldap3

    server = ldap3.Server(url_host, port=port, use_ssl=use_ssl, get_info=ldap3.NONE,
                          connect_timeout=10)
    conn = ldap3.Connection(server, user=user, password=password, receive_timeout=15,
                            raise_exceptions=False)
    assert conn.bind(), conn.result
    return conn


def everything(conn, base):
    """Every entry and attribute value the connection may read under ``base``."""
    import ldap3

    conn.search(base, "(objectClass=*)", search_scope=ldap3.SUBTREE,
                attributes=[ldap3.ALL_ATTRIBUTES])
    return {e.entry_dn.lower(): {k.lower(): sorted(map(str, v))
                                 for k, v in e.entry_attributes_as_dict.items()}
            for e in conn.entries}


SUFFIX = "dc=example,dc=test"


@pytest.fixture(scope="module")
def readers(slapd, tmp_path_factory):
    """Two daemons with plain LDAP listeners: app-password sessions read with
    proxied authorization (the default), or as a search account."""
    folder = tmp_path_factory.mktemp("proxy-readers")
    secret = folder / "reader-password"
    secret.write_text(slapd.reader_password + "\n")
    secret.chmod(0o600)
    listener = {"protocol": "ldap", "realm": "cloud", "tls": "none", "allow_plaintext_auth": True}
    proxied = ProxyDaemon(folder / "proxied", slapd, {"ldap": listener})
    account = ProxyDaemon(folder / "account", slapd, {"ldap": listener}, directory=(
        "  app_password_reads: search_account\n"
        f"  search_bind_dn: {slapd.reader_dn}\n"
        f"  search_bind_password_file: {secret}\n"))
    for daemon in (proxied, account):
        daemon.start()
    yield {"proxied": proxied, "search_account": account}
    for daemon in (proxied, account):
        assert daemon.stop() == 0


@pytest.mark.parametrize("mode", ["proxied", "search_account"])
def test_an_app_password_reads_no_more_than_its_user(readers, slapd, unique, mode):
    """Through the proxy, an app-password session sees what its user sees
    bound directly, less password hashes: never an entry or attribute only
    the proxy's accounts may read, nor their own entries."""
    daemon = readers[mode]
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY)
    secret = daemon.create_app_password(uid, "printer")
    direct = ldap_connection("127.0.0.1", slapd.port, dn, PRIMARY)
    through = ldap_connection("127.0.0.1", daemon.ports["ldap"], uid, secret)
    seen_directly = everything(direct, SUFFIX)
    seen_through = everything(through, SUFFIX)
    for attributes in seen_directly.values():
        attributes.pop("userpassword", None)
    assert seen_through == seen_directly
    assert slapd.service_dn.lower() not in seen_through
    assert slapd.reader_dn.lower() not in seen_through
    assert not any("userpassword" in a for a in seen_through.values())
    # An attribute only the proxy's account may read: the same answer as
    # the user gets directly, not compareTrue.
    direct.compare(slapd.service_dn, "cn", "proxy")
    through.compare(slapd.service_dn, "cn", "proxy")
    assert through.result["result"] == direct.result["result"] != 6
    # A compare of a password is a password check past the throttle, by
    # its name or its OID.
    for attribute in ("userPassword", "2.5.4.35"):
        through.compare(dn, attribute, PRIMARY)
        assert through.result["result"] == 50, attribute
    # Controls that could read more than entries (dereference) are refused.
    through.search(SUFFIX, "(objectClass=*)", controls=[
        ("1.3.6.1.4.1.4203.666.5.16", True, b"0\x0f0\r\x04\x06member0\x03\x04\x01*")])
    assert through.result["result"] == 12
    # The client's own proxied authorization would borrow the proxy's right.
    through.search(SUFFIX, "(objectClass=*)", controls=[
        ("2.16.840.1.113730.3.4.18", True, f"dn:{slapd.service_dn}".encode())])
    assert through.result["result"] == 123
    through.unbind()
    direct.unbind()


# -- sessions end whatever revoked them ---------------------------------------------------


def imaps(daemon, listener="imaps"):
    import ssl

    context = ssl.create_default_context(cafile=str(daemon.pki.ca_file))
    return imaplib.IMAP4_SSL("127.0.0.1", daemon.ports[listener], ssl_context=context, timeout=30)


def session_ends(client, timeout=15) -> bool:
    """Whether the proxy ends this logged-in IMAP session within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.noop()
        except (imaplib.IMAP4.abort, OSError):
            return True
        time.sleep(0.3)
    return False


def test_a_primary_password_change_ends_older_sessions(proxy, slapd, unique):
    """The directory changes the user's password: sessions opened with an
    app password created before it, and with the old primary password, end
    without waiting for a sign-in to notice; the app password is gone."""
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY)
    secret = proxy.create_app_password(uid, "phone")
    by_app_password = imaps(proxy)
    assert by_app_password.login(uid, secret)[0] == "OK"
    by_primary = imaps(proxy)
    assert by_primary.login(uid, PRIMARY)[0] == "OK"
    time.sleep(1.1)  # pwdChangedTime has a second's precision
    slapd.set_password(dn, "Changed-Passw0rd")
    assert session_ends(by_app_password)
    assert session_ends(by_primary)
    listing = proxy.cli("app-password", "list", uid, "--json")
    assert listing.returncode == 0
    assert [(a["name"], a["stopped"]) for a in json.loads(listing.stdout)] == [
        ("phone", "password_change")]  # stopped, and listed with why
    fresh = imaps(proxy)
    assert fresh.login(uid, "Changed-Passw0rd")[0] == "OK"
    assert not session_ends(fresh, timeout=3)  # a session after the change stays
    fresh.logout()


def test_blocking_legacy_authentication_ends_open_sessions(slapd, dovecot, unique, tmp_path):
    import signal

    with imaps_daemon(slapd, dovecot, tmp_path, unique) as (daemon, uid, secret):
        client = imaps(daemon)
        assert client.login(uid, secret)[0] == "OK"
        daemon.config.write_text(daemon.config.read_text()
                                 + "policy:\n  block_legacy_auth: true\n")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("config reloaded")
        assert session_ends(client)
        with pytest.raises(imaplib.IMAP4.error):
            imaps(daemon).login(uid, secret)


def test_joining_the_modern_auth_only_group_ends_sessions(proxy, slapd, unique):
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY)
    secret = proxy.create_app_password(uid, "phone")
    client = imaps(proxy)
    assert client.login(uid, secret)[0] == "OK"
    slapd.add_to_group(dn, "modern-auth-only")
    assert session_ends(client)


def test_one_user_from_one_address_holds_a_bounded_number_of_sessions(slapd, dovecot, unique,
                                                                        tmp_path):
    """Dovecot's mail_max_userip_connections, in front of it: the fourth
    session of one user from one address is a temporary failure; another
    address, or a session ended, makes room."""
    with imaps_daemon(slapd, dovecot, tmp_path, unique,
                      extra="limits:\n  max_sessions_per_user_and_source: 3\n") as (daemon, uid, secret):
        held = [imaps(daemon) for _ in range(3)]
        for client in held:
            assert client.login(uid, secret)[0] == "OK"
        extra = imaps(daemon)
        with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
            extra.login(uid, secret)
        held.pop().logout()
        assert wait_until(lambda: _logs_in(daemon, uid, secret), 10)
        assert "too_many_sessions" in audit_text(tmp_path / "audit.log")


def _logs_in(daemon, uid, secret):
    client = imaps(daemon)
    try:
        return client.login(uid, secret)[0] == "OK"
    except imaplib.IMAP4.error:
        return False


# -- faults -------------------------------------------------------------------------------


def test_a_backend_that_dies_mid_session_is_reported_to_the_client(proxy, dovecot, user):
    """Dovecot's process serving a session is killed: the client gets the
    protocol's goodbye at once, not a silent close, and nothing is left
    open on the proxy."""
    import os
    import signal as signals

    uid, _, secret = user
    since = len(dovecot.log_text())
    client = imaps(proxy)
    client.login(uid, secret)
    found = dovecot.wait_for_log(rf"imap-login: Info: Login: user=<{uid}>.*mpid=(\d+)", since=since)
    os.kill(int(found.group(1)), signals.SIGKILL)
    sock = client.socket()
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    assert b"* BYE The mail server closed the connection." in data
    client.shutdown()


def test_a_clean_logout_gets_no_extra_goodbye(proxy, user):
    uid, _, secret = user
    client = imaps(proxy)
    client.login(uid, secret)
    client.send(b"z LOGOUT\r\n")
    sock = client.socket()
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    assert data.count(b"* BYE") == 1 and b"z OK" in data
    assert b"closed the connection" not in data


def test_a_hung_directory_times_out_and_the_daemon_keeps_answering(slapd, dovecot, unique,
                                                                    tmp_path):
    """slapd stopped with SIGSTOP (it takes connections, answers nothing):
    primary passwords get the temporary failure within the directory's
    timeout, app passwords of accounts seen recently go on (outage grace),
    the daemon answers its health check meanwhile, and all is well again
    after SIGCONT."""
    import os
    import signal as signals
    import urllib.request

    from tests.proxyd import free_port

    metrics = free_port()
    with imaps_daemon(slapd, dovecot, tmp_path, unique,
                      directory="  timeout: 1s\n  outage_grace: 1h",
                      extra=f"metrics:\n  endpoint: tcp:{metrics}:interface=127.0.0.1\n") as (daemon, uid, secret):
        pid = slapd._process.pid
        assert imaps(daemon).login(uid, secret)[0] == "OK"
        os.kill(pid, signals.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
                imaps(daemon).login(uid, PRIMARY)
            assert time.monotonic() - started < 15  # bounded by the timeout, not by slapd
            assert imaps(daemon).login(uid, secret)[0] == "OK"  # outage grace
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/health/live", timeout=5) as r:
                assert r.status == 200
        finally:
            os.kill(pid, signals.SIGCONT)
        assert wait_until(lambda: _logs_in(daemon, uid, PRIMARY), 40)


def test_slapd_restarting_under_traffic_is_survived(slapd, dovecot, unique, tmp_path):
    """slapd restarts while clients sign in: primary passwords get the
    temporary failure meanwhile, app passwords go on, nothing stays stuck."""
    import threading

    with imaps_daemon(slapd, dovecot, tmp_path, unique,
                      directory="  timeout: 2s\n  outage_grace: 1h") as (daemon, uid, secret):
        assert _logs_in(daemon, uid, secret)
        results = {"app": [], "primary": []}
        stop = threading.Event()

        def traffic():
            while not stop.is_set():
                results["app"].append(_logs_in(daemon, uid, secret))
                results["primary"].append(_logs_in(daemon, uid, PRIMARY))

        worker = threading.Thread(target=traffic)
        worker.start()
        time.sleep(0.5)
        slapd.stop()
        time.sleep(1.5)
        slapd.start()
        assert wait_until(lambda: _logs_in(daemon, uid, PRIMARY), 40)
        stop.set()
        worker.join(60)
        assert not worker.is_alive()
        assert all(results["app"]), "an app password failed during the outage"
        assert not all(results["primary"]), "no primary login failed: the outage was not seen"


def test_a_locked_store_refuses_writes_clearly_and_sign_ins_go_on(slapd, dovecot, unique,
                                                                   tmp_path):
    """Another process holds the store's write lock (a backup, a stuck
    command): the command line tool says so and changes nothing, sign-ins
    go on (their last-used writes wait), and the store stays whole."""
    import sqlite3

    with imaps_daemon(slapd, dovecot, tmp_path, unique,
                      cache="  last_used_interval: 0") as (daemon, uid, secret):
        holder = sqlite3.connect(tmp_path / "store.sqlite3", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            done = daemon.cli("app-password", "create", uid, "--name", "laptop")
            assert done.returncode == 1
            assert "the store is locked by another process" in done.stderr
            assert "Traceback" not in done.stderr
            for _ in range(3):
                assert _logs_in(daemon, uid, secret)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        listing = daemon.cli("app-password", "list", uid)
        assert "phone" in listing.stdout and "laptop" not in listing.stdout
        check = sqlite3.connect(tmp_path / "store.sqlite3")
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        check.close()
        assert "Traceback" not in daemon.log()


def test_two_thousand_slow_clients_leave_room_for_real_ones(slapd, dovecot, unique, tmp_path):
    """2,000 connections from ten addresses that send a byte now and then
    and never log in: the daemon's memory stays bounded, a real client
    still signs in and reads its mailbox, and the slow ones are cut off at
    the login deadline."""
    daemon = ProxyDaemon(tmp_path, slapd, {
        "imap": dict(mail_backend(tmp_path, dovecot, "imap"), tls="none",
                     allow_plaintext_auth=True, login_timeout=8,
                     max_connections_per_source=1000),
    })
    daemon.start()
    try:
        uid = unique()
        slapd.add_user(uid, PRIMARY)
        secret = daemon.create_app_password(uid, "phone")
        pid, port = daemon.process.pid, daemon.ports["imap"]
        before = rss_kib(pid)
        slow = []
        for i in range(2000):
            sock = socket.socket()
            sock.bind((f"127.0.0.{2 + i % 10}", 0))
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            slow.append(sock)
        for byte in (b"a", b" ", b"N"):  # a command that never ends
            for sock in slow:
                try:
                    sock.send(byte)
                except OSError:
                    pass
        held = rss_kib(pid)
        client = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        assert client.login(uid, secret)[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        client.logout()
        print(f"2,000 slow clients: RSS {before} KiB before, {held} KiB with them")
        assert held - before < 100 * 1024
        assert wait_until(lambda: sum(closed(s) for s in slow) == len(slow), 60)
        for sock in slow:
            sock.close()
    finally:
        assert daemon.stop() == 0


def test_a_store_that_cannot_be_written_is_a_clear_error(slapd, dovecot, unique, tmp_path):
    """The command line tool cannot write a byte (RLIMIT_FSIZE 0: as a full
    disk is to it): it says what is wrong, without a traceback, changes
    nothing, and the daemon's sign-ins go on."""
    import resource
    import signal as signals
    import sqlite3
    import sys

    with imaps_daemon(slapd, dovecot, tmp_path, unique) as (daemon, uid, secret):

        def no_room():
            signals.signal(signals.SIGXFSZ, signals.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))

        done = subprocess.run([sys.executable, "-m", "proxy", "--config", str(daemon.config),
                               "app-password", "create", uid, "--name", "laptop"],
                              capture_output=True, text=True, timeout=60, preexec_fn=no_room)
        assert done.returncode != 0
        assert "nothing was changed" in done.stderr and "Traceback" not in done.stderr
        assert _logs_in(daemon, uid, secret)
        assert "laptop" not in daemon.cli("app-password", "list", uid).stdout
        check = sqlite3.connect(tmp_path / "store.sqlite3")
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        check.close()


def test_sigkill_of_the_daemon_amid_changes_leaves_the_store_whole(slapd, dovecot, unique,
                                                                    tmp_path):
    """The daemon is killed (SIGKILL) while it writes last-used times (a
    sign-in in flight), and the command line tool creates and deletes app
    passwords before, during and after: every sign-in before the kill
    succeeded, every command succeeded (a daemon killed mid-write leaves the
    store locked for no one), the store is whole afterwards, every record
    complete, and the daemon starts again on it."""
    import signal as signals
    import sqlite3
    import threading

    daemon = ProxyDaemon(tmp_path, slapd, {"imaps": dict(mail_backend(tmp_path, dovecot, "imap"),
                                                         tls="implicit")},
                         cache="  last_used_interval: 0\n  app_password_ttl: 0")
    daemon.start()
    uid = unique()
    slapd.add_user(uid, PRIMARY)
    secret = daemon.create_app_password(uid, "phone")
    stop = threading.Event()
    # (started, ended, outcome), on the monotonic clock.
    logins: list[tuple[float, float, object]] = []
    commands: list[tuple[float, float, subprocess.CompletedProcess, subprocess.CompletedProcess]] = []

    def churn():
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            created = daemon.cli("app-password", "create", uid, "--name", f"device {n}")
            deleted = daemon.cli("app-password", "delete", uid, f"device {n}")
            commands.append((started, time.monotonic(), created, deleted))
            n += 1

    def sign_in():
        while not stop.is_set():
            started = time.monotonic()
            try:
                outcome = _logs_in(daemon, uid, secret)
            except (OSError, imaplib.IMAP4.abort) as e:
                # The daemon is gone: killed during the TLS handshake, or
                # after it and before the greeting (imaplib's "EOF").
                outcome = e
            logins.append((started, time.monotonic(), outcome))

    workers = [threading.Thread(target=churn), threading.Thread(target=sign_in)]
    for worker in workers:
        worker.start()
    try:
        # Writes under way on both sides before the kill.
        assert wait_until(lambda: sum(o is True for *_, o in logins) >= 10 and len(commands) >= 2,
                          60), (logins, commands)
        killed = time.monotonic()
        daemon.process.send_signal(signals.SIGKILL)
        assert daemon.process.wait(30) == -signals.SIGKILL
        dead = time.monotonic()
        # The command line tool goes on writing the store the daemon died on.
        assert wait_until(lambda: any(started > dead for started, *_ in commands), 60), commands
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
    before = [o for _, ended, o in logins if ended < killed]
    assert before and all(o is True for o in before), [o for o in before if o is not True]
    assert any(started < killed < ended for started, ended, _ in logins), \
        "no sign-in was in flight when the daemon was killed"
    assert all(o is not True for started, _, o in logins if started > dead)
    for *_, created, deleted in commands:
        assert (created.returncode, deleted.returncode) == (0, 0), created.stderr + deleted.stderr
    db = sqlite3.connect(tmp_path / "store.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for row in db.execute("SELECT id, username, name, lookup_key, password_hash FROM app_passwords"):
        assert all(row) and len(row[3]) == 32 and row[4].startswith("$argon2id$")
    names = [name for (name,) in db.execute("SELECT name FROM app_passwords")]
    assert names == ["phone"], names  # every device created was deleted
    db.close()
    daemon.start()
    try:
        assert _logs_in(daemon, uid, secret)
    finally:
        assert daemon.stop() == 0
