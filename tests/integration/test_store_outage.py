"""A node started while its PostgreSQL store cannot be reached: the daemon
exits 75 (EX_TEMPFAIL) at once, the supervisor starts it again (systemd's
Restart=, as the shipped unit does; tests/integration/test_systemd.py checks
the unit), and once the database is back the node serves sign-ins. The
command line tool says so in one line and exits 75; a wrong password is
configuration (78), not an outage."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import require_tool, wait_until
from tests.proxyd import Output, ProxyDaemon

pytestmark = pytest.mark.integration


@pytest.fixture
def stopped_postgres():
    """A PostgreSQL of this test's own, made on a free port but not started:
    nothing listens there yet."""
    require_tool("setpriv")
    from tests.postgres import Postgres, _bin

    try:
        _bin("initdb")
    except FileNotFoundError:
        require_tool("initdb")
    server = Postgres()
    server.init()
    yield server
    server.remove()


def serve(daemon: ProxyDaemon) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "--config", str(daemon.config), "serve"],
                          cwd=daemon.folder, capture_output=True, text=True, timeout=60)


class Supervisor:
    """What systemd does with the shipped unit (Restart=on-failure, no start
    limit, RestartPreventExitStatus=78): start the daemon again whenever it
    exits with anything but 0 or 78."""

    def __init__(self, daemon: ProxyDaemon) -> None:
        self.daemon = daemon
        self.exits: list[int] = []
        self.process: subprocess.Popen | None = None
        self.output: Output | None = None
        self.started = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "--config", str(self.daemon.config), "serve"],
                cwd=self.daemon.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True)
            self.output = Output(self.process)
            code = self.process.wait()
            self.exits.append(code)
            if code in (0, 78):
                return
            self._stop.wait(0.5)  # RestartSec, shortened

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            output = self.output
            if output is not None:
                try:
                    output.wait_for("legacy-auth-proxy started", timeout=1)
                    return
                except AssertionError:
                    pass
        raise AssertionError(f"not started; exits {self.exits}")

    def stop(self) -> int | None:
        self._stop.set()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
        self._thread.join(30)
        return self.exits[-1] if self.exits else None


def test_a_node_started_while_the_database_is_down_comes_back_when_it_returns(
        slapd, stopped_postgres, tmp_path, unique):
    ldapwhoami = require_tool("ldapwhoami")
    postgres = stopped_postgres
    password_file = postgres.password_file(tmp_path)
    daemon = ProxyDaemon(
        tmp_path / "node", slapd,
        {"ldap": {"protocol": "ldap", "realm": "cloud", "tls": "none",
                  "allow_plaintext_auth": True}},
        store=f"  url: {postgres.url('postgres')}\n  password_file: {password_file}\n"
              f"  timeout: 5s")

    # The daemon: one line saying why, and 75, not 78 (which systemd would
    # never restart); no warnings of psycopg's pool while it tried.
    done = serve(daemon)
    assert done.returncode == 75, done.stdout + done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "the store cannot be reached" in done.stderr and "temporary" in done.stderr
    assert "psycopg" not in done.stdout + done.stderr

    # The command line tool: the same, at once.
    uid = unique("outage")
    done = daemon.cli("app-password", "list", uid)
    assert done.returncode == 75, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert "the store cannot be reached" in done.stderr and "temporary" in done.stderr
    assert "psycopg" not in done.stderr and done.stdout == ""

    supervisor = Supervisor(daemon)
    try:
        assert wait_until(lambda: len(supervisor.exits) >= 2, 60), supervisor.exits
        postgres.start()
        supervisor.wait_started(60)
        assert set(supervisor.exits) == {75}, supervisor.exits
        dn = slapd.add_user(uid, "Primary-Passw0rd")
        secret = daemon.create_app_password(uid, "phone")
        signed_in = subprocess.run(
            [ldapwhoami, "-x", "-H", f"ldap://127.0.0.1:{daemon.ports['ldap']}", "-D", uid,
             "-w", secret], capture_output=True, text=True, timeout=60)
        assert signed_in.returncode == 0, signed_in.stderr
        assert signed_in.stdout.strip() == f"dn:{dn}"
    finally:
        last = supervisor.stop()
    assert last == 0

    # A wrong password is configuration: 78, which is not restarted.
    password_file.write_text("not-the-password\n")
    done = daemon.cli("app-password", "list", uid)
    assert done.returncode == 78, done.stderr
    assert "authentication failed" in done.stderr and "temporary" not in done.stderr
    done = serve(daemon)
    assert done.returncode == 78, done.stdout + done.stderr

