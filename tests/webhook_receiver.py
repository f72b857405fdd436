"""A real webhook receiver for the tests: an HTTP server (the standard
library's, on a thread of the test process) on a free loopback port that
checks each post's signature as docs/events.md tells a receiver to, and
keeps what it was sent. It is what an operator runs: it can be down (its
port closed), failing (503) or stuck (holding its answers)."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.ports import free_port

TOLERANCE = 300  # seconds a signature's timestamp may be off


def verify(secret: bytes, header: str, body: bytes, now: float) -> bool:
    """docs/events.md's check, as a receiver writes it."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > TOLERANCE:
        return False
    expected = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))


class Receiver:
    def __init__(self, folder: Path, pki=None) -> None:
        """``pki`` (tests/pki.py): serve HTTPS with its server certificate."""
        self.pki = pki
        self.port = free_port()
        self.secret = b"whsec_" + hashlib.sha256(str(folder).encode()).hexdigest().encode()
        self.secret_file = Path(folder) / "webhook-secret"
        self.secret_file.write_bytes(self.secret + b"\n")
        self.secret_file.chmod(0o600)
        self.url = f"{'https' if pki else 'http'}://127.0.0.1:{self.port}/hook"
        self.events: list[dict] = []  # each post answered 2xx, in the order answered
        self.posts = 0  # every post, whatever its answer
        self.bad_signatures = 0
        self.status = 200
        self.holding = threading.Event()  # set: posts wait, unanswered
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._connections: set = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # connections kept open, as a real receiver's are

            def setup(self) -> None:
                super().setup()
                with receiver._lock:
                    receiver._connections.add(self.connection)

            def finish(self) -> None:
                with receiver._lock:
                    receiver._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.posts += 1
                    good = verify(receiver.secret,
                                  self.headers.get("Legacy-Auth-Proxy-Signature", ""), body,
                                  time.time())
                    if not good:
                        receiver.bad_signatures += 1
                if receiver.holding.is_set():
                    receiver._released.wait(120)
                status = receiver.status if good else 400
                if 200 <= status < 300:
                    with receiver._lock:
                        receiver.events.append(json.loads(body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default 5 drops connections the proxy opens at once

            def handle_error(self, request, client_address) -> None:
                pass  # a daemon killed, a post cut short by its timeout: what the tests do

        self._server = Server(("127.0.0.1", self.port), Handler)
        if self.pki is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.pki.cert_file), str(self.pki.key_file))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Down: the port closed (connections refused)."""
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        # And the connections kept open: down is down.
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def hold(self) -> None:
        """Posts from now on wait, unanswered, until :meth:`release`."""
        self._released.clear()
        self.holding.set()

    def release(self) -> None:
        """Answer the held posts (and those to come)."""
        self.holding.clear()
        self._released.set()

    def received(self, event: str | None = None, user: str | None = None) -> list[dict]:
        with self._lock:
            return [e for e in self.events if (event is None or e["event"] == event)
                    and (user is None or e.get("user") == user)]
