"""The private parts of Twisted this proxy relies on, checked once at start.

A few hot paths reach under Twisted's public interfaces: the bytes still
queued for a hang-up's deadline (:func:`proxy.transports.pending_output`),
a write that skips Twisted's queue when it is empty
(:func:`proxy.transports.write_now`), TLS records written in one go
(:class:`proxy.tls.RelayTLS`, put in place by changing the class of the
layer Twisted made), the endpoint's wrapper taken out of a backend
connection (:func:`proxy.backends.connect`), the side a connected
socket's startTLS speaks (:class:`proxy.transports.AddressEndpoint`), and
the epoll reactor's loop (:class:`proxy.reactor.Reactor`). A Twisted release that renames
one of them would otherwise go unnoticed there, or fail on the first
connection that takes that path: :func:`check_twisted` finds it at start,
with a message that names what is missing. pyproject.toml caps Twisted at
the major version this was tested with.
"""

from __future__ import annotations

from typing import Any


class TwistedMismatch(RuntimeError):
    """The installed Twisted lacks a private name the proxy relies on."""


def _missing_tls() -> list[str]:
    from twisted.internet import ssl
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import StringTransport
    from twisted.protocols import tls

    missing = []
    if not isinstance(getattr(tls, "BufferingTLSTransport", None), type):
        return ["twisted.protocols.tls.BufferingTLSTransport"]
    if tls.TLSMemoryBIOFactory.protocol is not tls.BufferingTLSTransport:
        missing.append("TLSMemoryBIOFactory.protocol is BufferingTLSTransport "
                       "(proxy.tls.faster_tls swaps that class for RelayTLS)")
    for name in ("_write", "_bufferedWrite", "_tlsShutdownFinished", "_lostTLSConnection"):
        if not hasattr(tls.BufferingTLSTransport, name):
            missing.append(f"BufferingTLSTransport.{name}")
    # Instance attributes: a client TLS layer started over an in-memory
    # transport (it writes its ClientHello there; nothing leaves the process).
    factory = tls.TLSMemoryBIOFactory(ssl.optionsForClientTLS("localhost"), True,
                                      Factory.forProtocol(Protocol))
    layer = factory.buildProtocol(None)
    layer.makeConnection(StringTransport())
    for name in ("_tlsConnection", "_appSendBuffer"):
        if not hasattr(layer, name):
            missing.append(f"TLSMemoryBIOProtocol.{name}")
    if hasattr(layer, "_appSendBuffer") and not isinstance(layer._appSendBuffer, list):
        missing.append("TLSMemoryBIOProtocol._appSendBuffer as a list of bytes")
    if not hasattr(getattr(layer, "_tlsConnection", None), "bio_read"):
        missing.append("TLSMemoryBIOProtocol._tlsConnection.bio_read")
    return missing


def _missing_tcp() -> list[str]:
    from twisted.internet import abstract, endpoints, tcp
    from twisted.internet.protocol import Protocol

    missing = []
    for name in ("dataBuffer", "offset"):
        if not hasattr(abstract.FileDescriptor, name):
            missing.append(f"FileDescriptor.{name}")
    descriptor = abstract.FileDescriptor()
    for name in ("_tempDataBuffer", "_tempDataLen"):
        if not hasattr(descriptor, name):
            missing.append(f"FileDescriptor.{name}")
    if not hasattr(tcp.Connection, "_aborting"):
        missing.append("tcp.Connection._aborting")
    # Which side startTLS speaks (proxy.transports.AddressEndpoint's transport).
    if getattr(tcp.Client, "_tlsClientDefault", None) is not True:
        missing.append("tcp.Client._tlsClientDefault")
    wrapping: Any = getattr(endpoints, "_WrappingProtocol", None)
    if wrapping is None:
        missing.append("twisted.internet.endpoints._WrappingProtocol")
    else:
        wrapper = wrapping(None, Protocol())
        if not hasattr(wrapper, "_wrappedProtocol"):
            missing.append("endpoints._WrappingProtocol._wrappedProtocol")
    return missing


def _missing_starttls() -> list[str]:
    # The layer startTLS puts between a connection and its user keeps the
    # raw connection as ``_connection`` (proxy.transports.write_now).
    from twisted.internet import _newtls

    bypass = getattr(_newtls, "_BypassTLS", None)
    if bypass is None:
        return ["twisted.internet._newtls._BypassTLS"]
    connection = object()
    if vars(bypass(object, connection)).get("_connection") is not connection:
        return ["_newtls._BypassTLS._connection"]
    return []


def _missing_reactor() -> list[str]:
    # proxy.reactor.Reactor's loop: the poller, the sockets by descriptor,
    # and the dispatch of one event.
    from twisted.internet.epollreactor import EPollReactor

    missing = []
    if not hasattr(EPollReactor, "_doReadOrWrite"):
        missing.append("EPollReactor._doReadOrWrite")
    reactor = EPollReactor()
    try:
        if not isinstance(getattr(reactor, "_selectables", None), dict):
            missing.append("EPollReactor._selectables as a dict")
        if not hasattr(getattr(reactor, "_poller", None), "poll"):
            missing.append("EPollReactor._poller")
    finally:  # its waker's pipe and its epoll descriptor given back
        reactor.removeReader(reactor.waker)
        reactor.waker.connectionLost(None)
        reactor._poller.close()
    return missing


def check_twisted() -> None:
    """Raise :class:`TwistedMismatch` naming every private Twisted name the
    proxy relies on that the installed Twisted lacks."""
    import twisted

    missing = _missing_tls() + _missing_tcp() + _missing_starttls() + _missing_reactor()
    if missing:
        raise TwistedMismatch(
            f"Twisted {twisted.__version__} lacks what this proxy relies on: {', '.join(missing)}; "
            f"install the Twisted version pyproject.toml names"
        )
