"""Logging in to backend servers as the user, and relaying the session."""

from __future__ import annotations

import base64
import urllib.parse
from typing import Any

import attrs
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from proxy.protocols import BACKEND_PORTS
from proxy.tls import client_options
from proxy.transports import hang_up, tcp_endpoint

MAX_SETUP_LINE = 65536


class _One(Factory):
    """A factory for one protocol instance that logs nothing per connection."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def connect(endpoint: Any, protocol: Protocol) -> Deferred[Protocol]:
    """``connectProtocol`` without a log line for every connection."""
    return endpoint.connect(_One(protocol))


class BackendRefused(Exception):
    """The backend refused the proxy's login as the user."""


class BackendConnection(Protocol):
    """A line-based set-up dialogue, then bytes relayed to the attached client."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._buffer = bytearray()
        self._waiting: Deferred[bytes] | None = None
        self._client: Any = None
        self.capabilities = b""

    # -- set-up --------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._client is not None:
            self._client.from_backend(data)
            return
        self._buffer += data
        self._deliver()

    def _deliver(self) -> None:
        if self._waiting is None:
            if len(self._buffer) > MAX_SETUP_LINE:
                self.transport.abortConnection()
            return
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > MAX_SETUP_LINE:
                self.transport.abortConnection()
            return
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        waiting, self._waiting = self._waiting, None
        waiting.callback(line)

    def connectionLost(self, reason: Any = None) -> None:
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(ConnectionError("the backend closed the connection"))
        if self._client is not None:
            client, self._client = self._client, None
            client.backend_lost()

    async def line(self) -> bytes:
        waiting: Deferred[bytes] = Deferred()
        self._waiting = waiting
        self._deliver()
        return await waiting

    # -- relay ---------------------------------------------------------------------

    def start_tls(self, options: Any) -> None:
        """Upgrade to TLS; anything already received in the clear is an
        injection attempt (CVE-2011-0411 class), not a reply: give up."""
        if self._buffer:
            self.transport.abortConnection()
            raise BackendRefused("the backend sent more than its STARTTLS answer")
        self.transport.startTLS(options)

    def attach(self, client: Any) -> None:
        self._client = client
        rest, self._buffer = bytes(self._buffer), bytearray()
        if rest:
            client.from_backend(rest)

    def detach(self) -> None:
        self._client = None

    def close(self) -> None:
        self._client = None
        hang_up(self.transport, self.clock)





@attrs.define
class MasterLogin:
    """What the IMAP and SMTP backends share: where the server is, TLS, the
    master identity it trusts, and how long a login may take. A subclass
    writes the dialogue (:meth:`dialogue`); this runs it on a new connection
    within ``timeout`` and drops the connection if it fails."""

    reactor: Any
    endpoint: Any
    starttls: Any | None  # client TLS options for STARTTLS, or None
    master_user: str | None
    master_password: str = attrs.field(repr=False)
    login_style: str
    pass_client_address: bool
    timeout: float
    hostname: str = "localhost"  # the proxy's name, where a protocol says it (EHLO)

    async def ready(self) -> None:
        """Called once before the listener opens: learn what the backend offers."""

    async def login(self, username: str, address: str, port: int) -> BackendConnection:
        d = Deferred.fromCoroutine(self._session(username, address, port))
        return await d.addTimeout(self.timeout, self.reactor)

    async def _session(self, username: str, address: str, port: int) -> BackendConnection:
        connection = BackendConnection(self.reactor)
        await connect(self.endpoint, connection)
        try:
            await self.dialogue(connection, username, address, port)
        except BaseException:
            connection.transport.abortConnection()
            raise
        return connection

    async def dialogue(
        self, connection: BackendConnection, username: str, address: str, port: int
    ) -> None:
        raise NotImplementedError

    def plain(self, username: str) -> bytes:
        """SASL PLAIN (RFC 4616) as the master user on behalf of ``username``, base64."""
        assert self.master_user is not None
        message = b"\x00".join(
            (username.encode(), self.master_user.encode(), self.master_password.encode())
        )
        return base64.b64encode(message)


def backend_endpoint(reactor: Any, url: str, ca_pem: bytes | None, timeout: float) -> tuple[Any, Any]:
    """The endpoint for a backend URL, and the TLS options for its host (used
    for implicit TLS here, or by the caller for STARTTLS)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or BACKEND_PORTS[parts.scheme]
    options = client_options(host, ca_pem)
    endpoint = tcp_endpoint(reactor, host, port, timeout)
    if parts.scheme.endswith("s"):
        endpoint = endpoints.wrapClientTLS(options, endpoint)
    return endpoint, options
