"""The private parts of Twisted the proxy relies on are there, and a Twisted
without one is refused at start with a message that names it."""

import pytest
from twisted.internet import endpoints
from twisted.protocols import tls

from proxy.twistedcheck import TwistedMismatch, check_twisted


def test_the_installed_twisted_has_every_private_name_relied_on():
    check_twisted()


def test_a_twisted_without_one_is_named(monkeypatch):
    monkeypatch.delattr(tls.TLSMemoryBIOProtocol, "_bufferedWrite")
    monkeypatch.delattr(endpoints, "_WrappingProtocol")
    with pytest.raises(TwistedMismatch) as raised:
        check_twisted()
    assert "BufferingTLSTransport._bufferedWrite" in str(raised.value)
    assert "_WrappingProtocol" in str(raised.value)


def test_a_tls_layer_of_another_class_is_named(monkeypatch):
    monkeypatch.setattr(tls.TLSMemoryBIOFactory, "protocol", tls.TLSMemoryBIOProtocol)
    with pytest.raises(TwistedMismatch, match="swaps that class"):
        check_twisted()
