"""`serve` and `demo` as processes: start, notify systemd, reload, stop."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import audit_text, wait_until
from tests.proxyd import Output


class Daemon:
    """A proxy process and its output."""

    def __init__(self, args, cwd, env=None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.reader = Output(self.process)
        self.output = self.reader.lines

    def wait_for(self, pattern, timeout=30.0):
        return self.reader.wait_for(pattern, timeout)

    def stop(self, sig=signal.SIGTERM):
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        self.reader.drain(timeout=10)
        return self.process.returncode


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(30)
    yield s, str(path)
    s.close()


def test_serve_notifies_reloads_and_stops(workdir, notify_socket):
    sock, address = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
    config = workdir / "config.yaml"
    daemon = Daemon(["--config", str(config), "serve"], cwd=workdir, env=env)

    def recv_state():
        while (state := sock.recv(100)) == b"WATCHDOG=1":
            pings.append(state)
        return state

    pings: list = []
    try:
        daemon.wait_for("legacy-auth-proxy started")
        assert recv_state() == b"READY=1"
        good = config.read_text()
        config.write_text(good + "policy:\n  block_legacy_auth: maybe\n")
        daemon.process.send_signal(signal.SIGHUP)
        line = daemon.wait_for("reload refused")
        assert f"{config}:" in line and "policy.block_legacy_auth" in line
        assert recv_state() == b"RELOADING=1"
        assert recv_state() == b"READY=1"
        assert daemon.process.poll() is None
        assert sock.recv(100) == b"WATCHDOG=1" and pings  # every 0.2 s
        config.write_text(good + "policy:\n  block_legacy_auth: true\n")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("config reloaded")
    finally:
        code = daemon.stop()
    assert code == 0
    events = [json.loads(line)["event"] for line in audit_text(workdir / "audit.log").splitlines()]
    assert events == ["daemon_started", "config_reloaded"]


def test_serve_refuses_a_pepper_others_can_read(workdir):
    pepper = workdir / "pepper"
    pepper.write_bytes(os.urandom(32))
    pepper.chmod(0o644)
    done = subprocess.run([sys.executable, "-m", "proxy", "--config", str(workdir / "config.yaml"),
                           "serve"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 78
    assert "chmod 600" in done.stderr


SECRET = re.compile(r"^    ([a-z]{4} [a-z]{4} [a-z]{4} [a-z]{4})$", re.MULTILINE)


def test_the_demo_sets_itself_up_in_a_local_folder(tmp_path):
    done = subprocess.run([sys.executable, "-m", "proxy", "demo", "--no-serve"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "legacy-auth-proxy-demo"
    assert {p.name for p in folder.iterdir()} >= {"config.yaml", "store.sqlite3", "pepper",
                                                   "audit.log", "tls"}
    assert SECRET.search(done.stdout)
    assert "curl --ssl-reqd" in done.stdout and "ldapwhoami" in done.stdout


def test_the_demo_serves_imap_pop3_submission_and_ldap_in_one_process(tmp_path):
    import imaplib
    import smtplib
    import ssl

    first = subprocess.run([sys.executable, "-m", "proxy", "demo", "--no-serve"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    daemon = Daemon(["demo"], cwd=tmp_path)
    try:
        daemon.wait_for("Ctrl-C stops it")
        daemon.wait_for("listening: submission")
        daemon.wait_for("portal on")  # the last part to open, after the listeners
        text = "\n".join(daemon.output)
        secret = SECRET.search(text)[1]
        assert secret != SECRET.search(first.stdout)[1]  # a new one every run
        imap_port = int(re.search(r"imap://127.0.0.1:(\d+)", text)[1])
        smtp_port = int(re.search(r"smtp://127.0.0.1:(\d+)", text)[1])
        ca = tmp_path / "legacy-auth-proxy-demo" / "tls" / "ca.pem"
        context = ssl.create_default_context(cafile=str(ca))
        smtp = smtplib.SMTP("127.0.0.1", smtp_port, timeout=30)
        smtp.starttls(context=context)
        smtp.login("demo", secret)
        smtp.sendmail("demo@example.test", ["demo@example.test"],
                      b"Subject: through the demo\r\n\r\nHello.\r\n")
        smtp.quit()
        imap = imaplib.IMAP4("127.0.0.1", imap_port, timeout=30)
        imap.starttls(context)
        assert imap.login("demo", secret)[0] == "OK"
        imap.select("INBOX")
        _, data = imap.fetch("1:*", "(BODY[HEADER.FIELDS (SUBJECT)])")
        subjects = b"".join(part[1] for part in data if isinstance(part, tuple))
        assert b"Welcome to the legacy-auth-proxy demo" in subjects
        assert b"through the demo" in subjects
        imap.logout()
        import poplib

        pop = poplib.POP3("127.0.0.1", int(re.search(r"pop3://127.0.0.1:(\d+)", text)[1]),
                          timeout=30)
        pop.stls(context)
        pop.user("demo")
        pop.pass_(secret)
        assert b"Subject: Welcome to the legacy-auth-proxy demo" in pop.retr(1)[1]  # lines, no CRLF
        pop.quit()
        import urllib.request

        metrics_url = re.search(r"(http://127.0.0.1:\d+)/metrics", text)[1]
        with urllib.request.urlopen(metrics_url + "/metrics", timeout=30) as answer:
            assert b'legacy_auth_proxy_sign_ins_total{outcome="accepted"' in answer.read()
        with urllib.request.urlopen(metrics_url + "/health/ready", timeout=30) as answer:
            assert answer.read() == b"ok\n"
        portal_url = re.search(r"(https://127.0.0.1:\d+)/", text)[1]
        with urllib.request.urlopen(portal_url + "/", timeout=30, context=context) as answer:
            page = answer.read().decode()
            assert answer.url.endswith("/sign-in") and "legacy-auth-proxy demo" in page
    finally:
        daemon.process.send_signal(signal.SIGINT)  # a second Ctrl-C is harmless
        assert daemon.stop(signal.SIGINT) == 0
    # An operator's log: no warnings, tracebacks or Twisted's port noise.
    log = "\n".join(daemon.output)
    for noise in ("Warning", "Traceback", "#warn", "#error", "#critical", "starting on",
                  "Port ", "Factory"):
        assert noise not in log, log
    listing = subprocess.run(
        [sys.executable, "-m", "proxy", "--config",
         str(tmp_path / "legacy-auth-proxy-demo" / "config.yaml"), "app-password", "list", "demo",
         "--json"], capture_output=True, text=True, timeout=60)
    assert [a["name"] for a in json.loads(listing.stdout)] == ["demo device"]


def directory_config(slapd, workdir, password=None):
    secret = workdir / "directory-password"
    secret.write_text((password or slapd.service_password) + "\n")
    secret.chmod(0o600)
    return (
        "directory:\n"
        f"  url: {slapd.url}\n"
        f"  ca_file: {slapd.ca_file}\n"
        f"  bind_dn: {slapd.service_dn}\n"
        f"  bind_password_file: {secret}\n"
        f"  user_base: {slapd.people_dn}\n"
    )


def test_serve_starts_with_a_directory(workdir, slapd):
    config = workdir / "config.yaml"
    config.write_text(config.read_text() + directory_config(slapd, workdir))
    daemon = Daemon(["--config", str(config), "serve"], cwd=workdir)
    try:
        line = daemon.wait_for("legacy-auth-proxy started")
        assert f"directory {slapd.url}" in line
    finally:
        assert daemon.stop() == 0


def test_serve_refuses_an_unreadable_directory_password(workdir, slapd):
    config = workdir / "config.yaml"
    config.write_text(config.read_text() + directory_config(slapd, workdir))
    (workdir / "directory-password").unlink()
    done = subprocess.run([sys.executable, "-m", "proxy", "--config", str(config), "serve"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78
    assert "directory.bind_password_file: cannot read" in done.stderr


def test_sigterm_lets_sessions_finish_then_says_goodbye(slapd, dovecot, tmp_path, unique):
    """SIGTERM: no new connections; signed-in sessions go on for the grace,
    then get IMAP BYE and SMTP 421; the daemon exits 0."""
    import imaplib
    import smtplib
    import ssl
    import time

    from tests.proxyd import ProxyDaemon, mail_backend

    daemon = ProxyDaemon(tmp_path, slapd, {
        "imap": mail_backend(tmp_path, dovecot, "imap"),
        "smtp": mail_backend(tmp_path, dovecot, "smtp"),
    })
    daemon.config.write_text(daemon.config.read_text().replace("  grace: 1s", "  grace: 3s"))
    daemon.start()
    uid = unique()
    slapd.add_user(uid, "Primary-Passw0rd")
    secret = daemon.create_app_password(uid, "phone")
    context = ssl.create_default_context(cafile=str(daemon.pki.ca_file))
    imap = imaplib.IMAP4("127.0.0.1", daemon.ports["imap"], timeout=30)
    imap.starttls(context)
    imap.login(uid, secret)
    smtp = smtplib.SMTP("127.0.0.1", daemon.ports["smtp"], timeout=30)
    smtp.starttls(context=context)
    smtp.login(uid, secret)
    waiting = socket.create_connection(("127.0.0.1", daemon.ports["imap"]), timeout=10)
    waiting.recv(4096)  # a connection not signed in
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for("waiting up to 3.0 s")
    assert waiting.recv(4096).startswith(b"* BYE")  # closed at once
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", daemon.ports["imap"]), timeout=5)
    assert imap.noop()[0] == "OK"  # still served during the grace
    assert smtp.noop()[0] == 250
    sock = imap.socket()
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    assert b"* BYE Server shutting down." in data
    assert time.monotonic() - started >= 2.5
    assert smtp.getreply()[0] == 421
    assert daemon.process.wait(timeout=30) == 0


def test_sighup_opens_and_closes_listeners_without_dropping_sessions(slapd, dovecot, tmp_path,
                                                                      unique):
    import imaplib
    import ssl

    from tests.proxyd import ProxyDaemon, free_port, mail_backend

    daemon = ProxyDaemon(tmp_path, slapd, {"imap": mail_backend(tmp_path, dovecot, "imap")})
    daemon.start()
    try:
        uid = unique()
        slapd.add_user(uid, "Primary-Passw0rd")
        secret = daemon.create_app_password(uid, "phone")
        context = ssl.create_default_context(cafile=str(daemon.pki.ca_file))
        session = imaplib.IMAP4("127.0.0.1", daemon.ports["imap"], timeout=30)
        session.starttls(context)
        session.login(uid, secret)
        old_port, new_port = daemon.ports["imap"], free_port()
        text = daemon.config.read_text()
        daemon.config.write_text(text.replace("  - name: imap\n", "  - name: imap-new\n")
                                 .replace(f"tcp:{old_port}:", f"tcp:{new_port}:"))
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("config reloaded")
        daemon.wait_for(r"listening: imap-new")
        assert session.noop()[0] == "OK"  # the session on the closed listener goes on
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", old_port), timeout=5)
        fresh = imaplib.IMAP4("127.0.0.1", new_port, timeout=30)
        fresh.starttls(context)
        assert fresh.login(uid, secret)[0] == "OK"
        fresh.logout()
        session.logout()
        # A listener that cannot open is logged; the others stay.
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        daemon.config.write_text(daemon.config.read_text().replace(
            "listeners:\n", "listeners:\n  - name: busy\n    protocol: ldap\n    realm: cloud\n"
            f"    endpoint: tcp:{taken}:interface=127.0.0.1\n    tls: none\n", 1))
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for(r"reload: listener busy: cannot listen")
        blocker.close()
        again = imaplib.IMAP4("127.0.0.1", new_port, timeout=30)
        again.logout()
        # The next reload, with the listener that never opened taken out, works.
        before = daemon.log().count("config reloaded")
        daemon.config.write_text(text.replace("  - name: imap\n", "  - name: imap-new\n")
                                 .replace(f"tcp:{old_port}:", f"tcp:{new_port}:")
                                 + "policy:\n  block_legacy_auth: true\n")
        daemon.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: daemon.log().count("config reloaded") > before, 30)
        with pytest.raises(imaplib.IMAP4.error):
            blocked = imaplib.IMAP4("127.0.0.1", new_port, timeout=30)
            blocked.starttls(context)
            blocked.login(uid, secret)
    finally:
        assert daemon.stop() == 0


def test_a_reload_that_moves_the_audit_file_writes_the_next_events_there(slapd, tmp_path, unique):
    """SIGHUP with a new audit.file, while sign-ins go on: from the reload on,
    events go to the new file, including those of sign-ins that were written
    while the reload was still reloading certificates (they used to reopen
    the old file, which then stayed in use until the next SIGHUP)."""
    import threading

    from tests.integration.test_directory_outage import ldap_bind
    from tests.proxyd import ProxyDaemon

    # Listeners with TLS: the reload awaits each certificate's reload.
    daemon = ProxyDaemon(tmp_path, slapd, {
        "ldap": {"protocol": "ldap", "realm": "cloud", "tls": "none", "allow_plaintext_auth": True},
        **{f"ldaps{i}": {"protocol": "ldap", "realm": "cloud"} for i in range(6)},
    })
    daemon.start()
    uid = unique()
    slapd.add_user(uid, "Primary-Passw0rd")
    secret = daemon.create_app_password(uid, "phone")
    dn = f"uid={uid},{slapd.people_dn}"
    old, new = tmp_path / "audit.log", tmp_path / "audit-new.log"
    stop = threading.Event()

    def sign_in_again_and_again() -> None:
        while not stop.is_set():
            assert ldap_bind(daemon, dn, secret) == 0

    signing_in = [threading.Thread(target=sign_in_again_and_again) for _ in range(6)]
    try:
        for thread in signing_in:
            thread.start()
        daemon.config.write_text(daemon.config.read_text().replace(
            "  file: audit.log", f"  file: {new.name}"))
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("config reloaded")
        stop.set()
        for thread in signing_in:
            thread.join(30)
        assert ldap_bind(daemon, dn, "not the secret") not in (0, None)

        def refused(path):
            return path.exists() and any(json.loads(line).get("outcome") == "refused"
                                         for line in path.read_text().splitlines())

        assert wait_until(lambda: refused(new), 10), daemon.log()
    finally:
        stop.set()
        assert daemon.stop() == 0
    old_events = [json.loads(line)["event"] for line in old.read_text().splitlines()]
    new_events = [json.loads(line)["event"] for line in new.read_text().splitlines()]
    assert "config_reloaded" in new_events and "config_reloaded" not in old_events
    assert not refused(old)


def test_a_rotated_audit_log_is_let_go_even_when_the_new_config_is_refused(slapd, tmp_path,
                                                                            unique):
    """logrotate moves the audit file and sends SIGHUP while the config on
    disk is broken: the reload is refused, but the next events go to a new
    audit.log, not to the rotated one."""
    from tests.integration.test_directory_outage import ldap_bind
    from tests.proxyd import ProxyDaemon

    daemon = ProxyDaemon(tmp_path, slapd, {
        "ldap": {"protocol": "ldap", "realm": "cloud", "tls": "none", "allow_plaintext_auth": True},
    })
    daemon.start()
    try:
        uid = unique()
        slapd.add_user(uid, "Primary-Passw0rd")
        dn = f"uid={uid},{slapd.people_dn}"
        audit, rotated = tmp_path / "audit.log", tmp_path / "audit.log.1"
        assert ldap_bind(daemon, dn, "Primary-Passw0rd") == 0
        assert wait_until(lambda: audit.exists() and uid in audit.read_text(), 10)
        audit.rename(rotated)
        daemon.config.write_text(daemon.config.read_text() + "\nno_such_section: 1\n")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("reload refused")
        assert ldap_bind(daemon, dn, "not the password") not in (0, None)
        assert wait_until(lambda: audit.exists() and "refused" in audit.read_text(), 10), \
            daemon.log()
        assert '"refused"' not in rotated.read_text()
    finally:
        assert daemon.stop() == 0


def test_serve_refuses_an_empty_master_password_file(slapd, tmp_path):
    """The backend's master password is read as the directory's are: an
    empty file is refused at start, naming the listener, the file and the key."""
    from tests.proxyd import ProxyDaemon

    master = tmp_path / "master-password"
    master.write_text("\n")
    master.chmod(0o600)
    daemon = ProxyDaemon(tmp_path, slapd, {"imap": {
        "protocol": "imap", "realm": "cloud", "backend": "imap://127.0.0.1:1",
        "master_user": "proxy", "master_password_file": str(master)}})
    done = subprocess.run([sys.executable, "-m", "proxy", "--config", str(daemon.config), "serve"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    assert f"listener imap: {master}: master_password_file is empty" in done.stderr
