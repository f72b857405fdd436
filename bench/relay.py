"""Relay throughput: one large message fetched over IMAP, directly from
Dovecot, through the proxy, and through nginx's mail proxy in front of the
same Dovecot (scenario 5 of the benchmarks; nginx is bench/nginx.py)."""

from __future__ import annotations

import socket
import time
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
