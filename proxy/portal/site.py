"""The portal's HTTP: every answer's security headers, and bodies kept small.

Every answer carries a strict Content-Security-Policy, no framing,
``Cache-Control: no-store`` and HSTS, and no Server header; a request body
larger than any form here is refused before it costs memory or disk. No
access log is written: what matters is audited, and URLs carry user names.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.web import http, server

from proxy.metrics import NoServerHeader
from proxy.transports import AFTER_GOODBYE, hang_up

MAX_BODY = 64 * 1024
MAX_DRAINED = 1024 * 1024  # past this, an oversized body is answered at once, not read to its end
TOO_LARGE = b"The request is larger than any form here.\n"
CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    b"Content-Security-Policy": CSP.encode(),
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"same-origin",
    b"Cache-Control": b"no-store",
    b"Strict-Transport-Security": b"max-age=31536000",
    b"Cross-Origin-Opener-Policy": b"same-origin",
    b"Permissions-Policy": b"camera=(), microphone=(), geolocation=()",
}


class Request(NoServerHeader, server.Request):
    """Every answer's security headers, and no Server header. A body over
    64 KiB (nothing the portal takes is larger), chunked or not, is never
    kept in memory or spooled to disk, and is answered 413: once read and
    dropped, up to 1 MiB of it; past 1 MiB (declared, or as it comes), at
    once, without waiting for the rest, and the connection closed in good
    order (the answer, TLS's close alert, FIN: :func:`proxy.transports.hang_up`),
    what else the client sends not read."""

    _received = 0
    _too_large = False
    _after_answer: int | None = None  # bytes since an answer made before the body came

    def process(self) -> None:
        if self._after_answer is not None:
            return  # the whole body came after all: answered already
        self._secure()
        if self._too_large:
            self._refuse()
            self.finish()
            return
        super().process()

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_DRAINED:
            # Answered before Twisted's "100 Continue" to a client that asks:
            # such a client then sends no body at all.
            self.requestHeaders.removeHeader(b"Expect")
            self._drop()
            self._answer_now()
            return
        if length is not None and length > MAX_BODY:
            self._drop()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._after_answer is not None:
            self._after_answer += len(data)
            if self._after_answer > AFTER_GOODBYE:
                self.channel.transport.pauseProducing()
            return
        if self._too_large:
            if self._received > MAX_DRAINED:
                self._answer_now()
            return
        if self._received > MAX_BODY:
            self._drop()
            return
        super().handleContentChunk(data)

    def _secure(self) -> None:
        for name, value in HEADERS.items():
            self.setHeader(name, value)

    def _refuse(self) -> None:
        self.setResponseCode(413)
        self.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        self.setHeader(b"Content-Length", b"%d" % len(TOO_LARGE))
        self.write(TOO_LARGE)

    def _drop(self) -> None:
        self._too_large = True
        self.content = io.BytesIO()

    def _answer_now(self) -> None:
        """413 before the body has come, then close: the request is never
        processed, and what the channel still parses of the body is dropped."""
        self._after_answer = 0
        self.clientproto = b"HTTP/1.1"  # Twisted takes the request line with the body
        self._secure()
        self.setHeader(b"Date", http.datetimeToString())
        self.setHeader(b"Connection", b"close")
        self._refuse()
        channel = self.channel
        channel.persistent = False
        hang_up(channel.transport, channel.site.reactor)


class Site(server.Site):
    requestFactory = Request
    displayTracebacks = False
    noisy = False

    def log(self, request: Any) -> None:
        """No access log: what matters is audited, and URLs carry user names."""
