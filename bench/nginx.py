"""nginx's mail proxy as the benchmarks' peer (Debian's nginx and
libnginx-mod-mail), in front of the same Dovecot as the proxy.

Its ``auth_http`` is answered by nginx itself: a static ``location`` in the
same process returns ``Auth-Status: OK`` with Dovecot's address and port, so
the peer pays nothing for a decision and its login path is nginx's alone.
It listens for IMAP (plaintext and implicit TLS) and for submission
(SMTP AUTH). One worker process, as the proxy's one reactor thread.

For SMTP, nginx answers the client's AUTH itself once ``auth_http`` said OK
and then only greets the backend (EHLO; ``xclient off``: Dovecot's
submission service does not take XCLIENT from an untrusted network): it
does not log in to Dovecot, where the proxy does. The peer does less than
the proxy there, which the report says.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")
INSTALL = ("DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
           "nginx libnginx-mod-mail")


def missing() -> str | None:
    """Why nginx's mail proxy cannot run here, with the command that fixes
    it; None when it can."""
    if shutil.which("nginx") is None:
        return f"nginx is not installed (as root: {INSTALL})"
    if not MODULE.exists():
        return f"nginx's mail module {MODULE} is not installed (as root: {INSTALL})"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Nginx:
    """nginx's mail proxy on loopback, in a session of its own so that its
    master and worker are one process group (for CPU accounting)."""

    def __init__(self, folder: Path, *, imap_port: int, submission_port: int,
                 certificate: tuple[Path, Path]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for temp in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (folder / temp).mkdir(exist_ok=True)
        self.port, self.tls_port, self.smtp_port, auth_port = (_free_port() for _ in range(4))
        (folder / "nginx.conf").write_text(f"""
load_module {MODULE};
worker_processes 1;
daemon off;
master_process on;
error_log {folder}/error.log;
pid {folder}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    map $http_auth_protocol $backend_port {{
        default {imap_port};
        smtp {submission_port};
    }}
    server {{
        listen 127.0.0.1:{auth_port};
        location = /auth {{
            add_header Auth-Status OK;
            add_header Auth-Server 127.0.0.1;
            add_header Auth-Port $backend_port;
            return 204;
        }}
    }}
}}
mail {{
    server_name bench.example.test;
    auth_http 127.0.0.1:{auth_port}/auth;
    proxy_buffer 64k;
    imap_auth login plain;
    smtp_auth login plain;
    xclient off;
    server {{
        listen 127.0.0.1:{self.port};
        protocol imap;
        proxy on;
    }}
    server {{
        listen 127.0.0.1:{self.tls_port} ssl;
        protocol imap;
        proxy on;
        ssl_certificate {certificate[0]};
        ssl_certificate_key {certificate[1]};
    }}
    server {{
        listen 127.0.0.1:{self.smtp_port};
        protocol smtp;
        proxy on;
    }}
}}
""")
        self.process = subprocess.Popen(
            ["nginx", "-p", str(folder), "-c", str(folder / "nginx.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 10
        for port in (self.port, self.tls_port, self.smtp_port, auth_port):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if self.process.poll() is not None:
                        raise RuntimeError(f"nginx exited: {self.process.stderr.read().decode()}"
                                           f"{(folder / 'error.log').read_text()[-2000:]}")
                    if time.monotonic() > deadline:
                        raise RuntimeError("nginx did not come up") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
