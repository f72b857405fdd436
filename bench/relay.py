"""Relay throughput: one large message fetched over IMAP, directly from
Dovecot, through the proxy, and through nginx's mail proxy in front of the
same Dovecot (scenario 5 of the benchmarks)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any


def fetch(port: int, user: str, password: str, tls: Any = None) -> tuple[int, float]:
    """Log in, FETCH the first message whole; (bytes received, seconds for
    the FETCH). With ``tls`` (an SSLContext), over implicit TLS."""
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname="localhost")

    def answer(tag: bytes) -> bytes:
        data = b""
        while not (data.startswith(tag + b" ") or b"\r\n" + tag + b" " in data) \
                or not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before {tag!r}: {data[-200:]!r}")
            data += chunk
        return data

    s.recv(4096)  # greeting
    s.sendall(b'a LOGIN "' + user.encode() + b'" "' + password.encode() + b'"\r\n')
    if b"a OK" not in answer(b"a"):
        raise RuntimeError("login failed")
    s.sendall(b"b SELECT INBOX\r\n")
    answer(b"b")
    started = time.perf_counter()
    s.sendall(b"c FETCH 1 BODY[]\r\n")
    received = 0
    tail = b""
    while b"\r\nc OK" not in tail:
        chunk = s.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed during FETCH")
        received += len(chunk)
        tail = (tail + chunk)[-64:]
    elapsed = time.perf_counter() - started
    s.sendall(b"d LOGOUT\r\n")
    s.close()
    return received, elapsed


class _Auth(BaseHTTPRequestHandler):
    """nginx's auth_http: every login is good, the backend is Dovecot."""

    backend_port = 0

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Auth-Status", "OK")
        self.send_header("Auth-Server", "127.0.0.1")
        self.send_header("Auth-Port", str(self.backend_port))
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class Nginx:
    """nginx's mail proxy (Debian's libnginx-mod-mail) on loopback."""

    def __init__(self, folder: Path, backend_port: int, certificate: tuple[Path, Path]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        handler = type("Auth", (_Auth,), {"backend_port": backend_port})
        self.auth = HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.auth.serve_forever, daemon=True).start()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.tls_port = probe.getsockname()[1]
        module = "/usr/lib/nginx/modules/ngx_mail_module.so"
        (folder / "nginx.conf").write_text(f"""
load_module {module};
worker_processes 1;
daemon off;
error_log {folder}/error.log;
pid {folder}/nginx.pid;
events {{ worker_connections 1024; }}
mail {{
    server_name bench.example.test;
    auth_http 127.0.0.1:{self.auth.server_address[1]}/auth;
    proxy_buffer 64k;
    imap_auth login plain;
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
}}
""")
        self.process = subprocess.Popen(["nginx", "-p", str(folder), "-c", str(folder / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(self.process.stderr.read().decode())
                time.sleep(0.05)
        raise RuntimeError("nginx did not come up")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.auth.shutdown()
