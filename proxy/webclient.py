"""Twisted's HTTP client as the daemon uses it, for the identity provider
(tokens, discovery, keys) and for webhooks: HTTPS checked against the
operator's CA or the system's trust store, every wait bounded by a timeout
on the clock passed in, and an answer read up to a limit, never whole
whatever its size (Twisted's ``readBody`` has no limit)."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from proxy.tls import client_options


class AnswerTooLarge(Exception):
    """The answer was larger than the caller allows."""


class AnswerCut(Exception):
    """The connection ended before the answer did."""


def pool(reactor: Any, per_host: int = 2) -> HTTPConnectionPool:
    """Persistent connections, up to ``per_host`` kept open to each server;
    requests are not retried by the pool: that is the caller's choice."""
    connections = HTTPConnectionPool(reactor, persistent=True)
    connections.maxPersistentPerHost = per_host
    connections.retryAutomatically = False
    return connections


def agent(reactor: Any, ca_pem: bytes | None, timeout: float,
          connections: HTTPConnectionPool | None = None) -> Any:
    """Twisted's HTTP client, trusting ``ca_pem`` (the system's store if
    None), connecting within ``timeout``, over ``connections`` (a
    :func:`pool` of its own if None)."""
    @implementer(IPolicyForHTTPS)
    class Trust:
        def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
            return client_options(hostname.decode("idna"), ca_pem)

    return Agent(reactor, contextFactory=Trust(), connectTimeout=timeout,
                 pool=connections if connections is not None else pool(reactor))


class _Bounded(Protocol):
    def __init__(self, done: Deferred[bytes], limit: int, cut_short: bool) -> None:
        self.done = done
        self.limit = limit
        self.cut_short = cut_short
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) <= self.limit:
            self.data += data
        if len(self.data) > self.limit and self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if self.done.called:
            return
        if len(self.data) > self.limit:
            if self.cut_short:
                self.done.callback(bytes(self.data[:self.limit]))
            else:
                self.done.errback(AnswerTooLarge())
        elif reason is not None and not reason.check(ResponseDone, PotentialDataLoss):
            self.done.errback(AnswerCut())
        else:
            self.done.callback(bytes(self.data))


async def request(agent: Any, clock: Any, method: bytes, url: str, *, timeout: float,
                  limit: int, headers: dict[bytes, list[bytes]] | None = None,
                  body: bytes | None = None, cut_short: bool = False) -> tuple[int, bytes]:
    """``method`` ``url``: the status and up to ``limit`` bytes of the
    answer. Past ``limit`` the rest is not read: :class:`AnswerTooLarge`,
    or with ``cut_short`` the first ``limit`` bytes (for an answer only
    glanced at). Waiting for the status and for the answer are each bounded
    by ``timeout``. Errors are Twisted's own (refused, TLS, timed out) and
    the two above; none of them holds the URL."""
    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    d = agent.request(method, url.encode("ascii"), Headers(headers or {}), producer)
    d.addTimeout(timeout, clock)
    response = await d
    done: Deferred[bytes] = Deferred()
    response.deliverBody(_Bounded(done, limit, cut_short))
    done.addTimeout(timeout, clock)
    return int(response.code), await done


async def get_json(agent: Any, clock: Any, url: str, timeout: float,
                   limit: int = 256 * 1024) -> dict[str, Any]:
    """GET a JSON object (a provider's JWKS); raises on anything else."""
    code, body = await request(agent, clock, b"GET", url, timeout=timeout, limit=limit,
                               headers={b"Accept": [b"application/json"]})
    if code != 200:
        raise ValueError(f"{url} answered {code}")
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError(f"{url} answered without a JSON object")
    return document
