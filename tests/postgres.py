"""A real PostgreSQL server for the tests: initdb in a temporary folder, on a
free loopback port, password authentication, run as an unprivileged user
(PostgreSQL refuses to run as root: as root, the tests run it as the
``postgres`` user that Debian's package creates)."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.ports import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path:
        return path
    raise FileNotFoundError(f"{name} (Debian package postgresql)")


class Postgres:
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="lap-postgres-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.user = "lap"
        self.password = secrets.token_urlsafe(18)
        self.database = "lap"
        self._as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._as = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}",
                        "--init-groups", "--"]
        os.chmod(self.folder, 0o700)

    def url(self, database: str | None = None) -> str:
        return (f"postgresql://{self.user}@127.0.0.1:{self.port}/{database or self.database}"
                f"?sslmode=disable")

    def _run(self, *args: str, input: str | None = None) -> None:
        done = subprocess.run([*self._as, *args], capture_output=True, text=True, input=input,
                              timeout=120, cwd=self.folder)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        pwfile = self.folder / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            owner = pwd.getpwnam("postgres")
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        self._run(_bin("initdb"), "-D", str(self.data), "-U", self.user, "--pwfile", str(pwfile),
                  "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.folder}'\nfsync = off\n"
                       f"synchronous_commit = off\nfull_page_writes = off\n"
                       f"max_connections = 200\n")

    def start(self) -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "log"), "-w",
                  "-t", "60", "start")

    def stop(self) -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), password=self.password, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def password_file(self, folder: Path) -> Path:
        path = Path(folder) / "postgres-password"
        path.write_text(self.password + "\n")
        path.chmod(0o600)
        return path

    def remove(self) -> None:
        try:
            self.stop()
        except Exception:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
