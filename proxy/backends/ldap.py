"""A session's own connection to the upstream directory.

After a client's bind is accepted, its session gets a connection of its own
to the directory: upgraded with StartTLS if the directory is configured so,
bound as the user (primary password) or as the service account (app
password), then relayed message by message. Messages are framed (header
only, never decoded) so that the proxy can write its own at message
boundaries, such as a notice of disconnection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from proxy.backends import connect
from proxy.wire import ber
from proxy.transports import hang_up

log = Logger(namespace="legacy_auth_proxy.backends.ldap")

# Messages from the directory may be large (an entry with many values); the
# limit only guards against a broken peer.
MAX_UPSTREAM_MESSAGE = 64 * 1024 * 1024
# The message id of the proxy's own requests on a session's connection: the
# largest there is, so that it never meets a client's (RFC 4511 4.1.1.1).
OWN_ID = 2**31 - 1


class UpstreamRefused(Exception):
    """The directory refused the session's bind."""


class UpstreamLDAP(Protocol):
    """Answers to the proxy's own requests (id ``OWN_ID``) go to the waiting
    request; everything else to ``on_frame``."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._framer = ber.Framer(MAX_UPSTREAM_MESSAGE, max_depth=64)
        self._waiting: Deferred[bytes] | None = None
        self.on_frame: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.bound_as: str | None = None  # None: anonymous
        self.closed = False
        self.lost = Deferred()

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._framer.feed(data)
        except ber.BERError as e:
            log.warn("the directory sent a malformed message: {error}", error=str(e))
            self.transport.abortConnection()
            return
        for frame in frames:
            try:
                id = ber.parse_message(frame).id
            except ber.BERError:
                self.transport.abortConnection()
                return
            if id == OWN_ID and self._waiting is not None:
                waiting, self._waiting = self._waiting, None
                waiting.callback(frame)
            elif self.on_frame is not None:
                self.on_frame(frame)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(ConnectionError("the directory closed the connection"))
        if self.on_lost is not None:
            self.on_lost()
        self.lost.callback(None)

    async def request(self, frame: bytes) -> ber.Message:
        """Send one of the proxy's own requests (id ``OWN_ID``); its answer."""
        waiting: Deferred[bytes] = Deferred()
        self._waiting = waiting
        self.transport.write(frame)
        return ber.parse_message(await waiting)

    async def bind(self, dn: str | None, password: str, reactor: Any, timeout: float) -> None:
        """Bind as ``dn`` (None: anonymous) on this connection. Raises
        UpstreamRefused if the directory says no."""
        answer = self.request(ber.bind_request(OWN_ID, dn or "", password))
        response = await Deferred.fromCoroutine(answer).addTimeout(timeout, reactor)
        code = ber.parse_result_code(response)
        if code != ber.SUCCESS:
            self.bound_as = None
            raise UpstreamRefused(f"the directory answered the bind with {code}")
        self.bound_as = dn

    def send(self, frame: bytes) -> None:
        self.transport.write(frame)

    def close(self) -> None:
        self.closed = True
        hang_up(self.transport, self.clock)


async def open_upstream(
    reactor: Any,
    endpoint: Any,
    start_tls: Any | None,
    bind_dn: str | None,
    password: str,
    timeout: float,
) -> UpstreamLDAP:
    """Connect, upgrade and bind; an UpstreamLDAP ready to relay. Raises
    UpstreamRefused if the bind is refused, other errors if the directory
    cannot be reached in ``timeout`` seconds."""
    protocol = UpstreamLDAP(reactor)
    connected = connect(endpoint, protocol)
    connected.addTimeout(timeout, reactor)
    await connected
    try:
        if start_tls is not None:
            answer = protocol.request(ber.extended_request(OWN_ID, ber.START_TLS))
            response = await Deferred.fromCoroutine(answer).addTimeout(timeout, reactor)
            if ber.parse_result_code(response) != ber.SUCCESS:
                raise ConnectionError("the directory refused StartTLS")
            protocol.transport.startTLS(start_tls)
        if bind_dn is not None:
            await protocol.bind(bind_dn, password, reactor, timeout)
    except BaseException:
        protocol.transport.abortConnection()
        raise
    return protocol
