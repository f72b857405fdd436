"""The real daemon, run as a process for integration tests: its config, its
store (managed with the real command line tool) and its log."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.pki import make_pki
from tests.ports import free_port  # noqa: F401 (tests import it from here too)


def mail_backend(folder: Path, dovecot, protocol: str) -> dict:
    """Listener settings for an IMAP or SMTP listener in front of the test
    Dovecot, logging in as its master user (whose password file it writes)."""
    master = Path(folder) / "master-password"
    master.write_text(dovecot.master_password + "\n")
    master.chmod(0o600)
    port = dovecot.imap_port if protocol == "imap" else dovecot.submission_port
    return {
        "protocol": protocol, "realm": "cloud",
        "backend": f"{protocol}://127.0.0.1:{port}",
        "master_user": dovecot.master_user, "master_password_file": str(master),
    }


class Output:
    """A process's output, read line by line on a thread of its own."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> str:
        """The first line (seen before or arriving now) that matches."""
        for line in self.lines:
            if re.search(pattern, line):
                return line
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines[-60:]))

    def drain(self, timeout: float = 0.0) -> str:
        """Everything read so far (waiting up to ``timeout`` for the end)."""
        if timeout:
            self._reader.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "\n".join(self.lines)


class ProxyDaemon:
    """``legacy-auth-proxy serve`` with listeners on free loopback ports.

    ``listeners`` maps a name to a dict of listener settings (protocol, realm,
    tls, ...); each gets a free port, readable as ``ports[name]``.
    """

    def __init__(self, folder: Path, slapd, listeners: dict[str, dict], extra: str = "",
                 hashing: str = "  time_cost: 1\n  memory_kib: 1024",
                 throttle: str = "  source_delay: 0.01\n  source_delay_max: 0.01\n"
                                 "  account_failures: 1000",
                 account_cache: str = "0", cache: str = "", directory: str = "",
                 store: str = "", interface: str = "127.0.0.1", ports: dict | None = None,
                 workers: int | str | None = None):
        self.folder = Path(folder)
        self.workers = workers
        self.folder.mkdir(parents=True, exist_ok=True)
        self.slapd = slapd
        self.pki = make_pki(self.folder / "pki")
        self.ports = {name: (ports or {}).get(name) or free_port() for name in listeners}
        secret = self.folder / "directory-password"
        secret.write_text(slapd.service_password + "\n")
        secret.chmod(0o600)
        lines = [
            *([f"workers: {workers}"] if workers is not None else []),
            "store:", "  path: store.sqlite3", "  pepper_file: pepper", *store.splitlines(),
            "audit:", "  file: audit.log",
            "hashing:", *hashing.splitlines(),
            "directory:",
            f"  url: {slapd.url}",
            f"  ca_file: {slapd.ca_file}",
            f"  bind_dn: {slapd.service_dn}",
            f"  bind_password_file: {secret}",
            f"  user_base: {slapd.people_dn}",
            f"  mfa_group: {slapd.group_dn('mfa')}",
            f"  modern_auth_only_group: {slapd.group_dn('modern-auth-only')}",
            f"  admin_group: {slapd.group_dn('admins')}",
            f"  account_cache: {account_cache}",
            *directory.splitlines(),
            "throttle:", *throttle.splitlines(),
            # Sessions a test left open do not hold up its stop.
            "shutdown:", "  grace: 1s",
            *(["cache:", *cache.splitlines()] if cache else []),
            "listeners:",
        ]
        for name, settings in listeners.items():
            lines.append(f"  - name: {name}")
            lines.append(f"    endpoint: tcp:{self.ports[name]}:interface={interface}")
            settings = {"tls": "starttls", **settings}
            if settings["tls"] != "none":
                settings.setdefault("certificate", str(self.pki.cert_file))
                settings.setdefault("private_key", str(self.pki.key_file))
            for key, value in settings.items():
                lines.append(f"    {key}: {json.dumps(value)}")
        self.config = self.folder / "config.yaml"
        self.config.write_text("\n".join(lines) + "\n" + extra)
        self.process: subprocess.Popen | None = None
        self.reader: Output | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(self.config), "serve"],
            cwd=self.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env,
        )
        self.reader = Output(self.process)
        if self.workers is not None:
            self.wait_for("supervisor: .* workers ready", 90)
        else:
            self.wait_for("legacy-auth-proxy started")

    def wait_for(self, pattern: str, timeout: float = 30.0) -> str:
        assert self.reader is not None
        return self.reader.wait_for(pattern, timeout)

    def log(self) -> str:
        assert self.reader is not None
        return self.reader.drain()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "--config", str(self.config), *args],
            capture_output=True, text=True, timeout=60,
        )
        return done

    def create_app_password(self, user: str, name: str, *extra: str) -> str:
        done = self.cli("app-password", "create", user, "--name", name, "--json", *extra)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["secret"]

    def stop(self) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode

    def worker_roles(self) -> dict[int, tuple[int, dict]]:
        """With workers: each running worker's (process id, role), by index,
        read from /proc: the supervisor's children and their environments."""
        assert self.process is not None
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            return {}  # the supervisor is gone
        roles = {}
        for child in children:
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except (FileNotFoundError, ProcessLookupError):
                continue  # gone since
            for entry in environ:
                if entry.startswith(b"LEGACY_AUTH_PROXY_WORKER="):
                    role = json.loads(entry.split(b"=", 1)[1])
                    roles[role["index"]] = (int(child), role)
        return roles

    def env(self) -> dict[str, str]:
        """Environment for OpenLDAP's clients: trust the proxy's test CA."""
        env = dict(os.environ)
        env.update({"LDAPTLS_CACERT": str(self.pki.ca_file), "LDAPTLS_REQCERT": "demand"})
        return env
