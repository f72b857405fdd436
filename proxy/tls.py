"""Server-side TLS whose certificate can be replaced while the daemon runs.

Listeners hold one :class:`ServerTLS` each. It is the connection creator given
to ``startTLS`` (STARTTLS) and to ``TLSMemoryBIOFactory`` (implicit TLS);
:meth:`ServerTLS.reload` reads the files again (off the reactor thread) and
new handshakes use the new certificate. Connections already up keep theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import BufferingTLSTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy.transports import write_now


class TLSFilesError(Exception):
    """The certificate or key cannot be used; the text names the file and why."""


def _load(certificate: Path, private_key: Path) -> ssl.CertificateOptions:
    try:
        chain_pem = certificate.read_bytes()
        key_pem = private_key.read_bytes()
    except OSError as e:
        raise TLSFilesError(f"{e.filename}: cannot read: {e.strerror}") from None
    marker = b"-----END CERTIFICATE-----"
    pems = [part + marker for part in chain_pem.split(marker) if b"BEGIN CERTIFICATE" in part]
    if not pems:
        raise TLSFilesError(f"{certificate}: no PEM certificate in it")
    try:
        leaf = ssl.PrivateCertificate.loadPEM(pems[0] + b"\n" + key_pem)
        chain = [ssl.Certificate.loadPEM(p).original for p in pems[1:]]
    except Exception:
        raise TLSFilesError(
            f"{certificate}, {private_key}: not a certificate and its private key"
        ) from None
    if leaf.privateKey.original.to_cryptography_key().public_key().public_numbers() != (
        leaf.original.to_cryptography().public_key().public_numbers()
    ):
        raise TLSFilesError(f"{private_key}: the key does not belong to {certificate}")
    return ssl.CertificateOptions(
        privateKey=leaf.privateKey.original,
        certificate=leaf.original,
        extraCertChain=chain,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server side's TLS connections, from a certificate that can be reloaded."""

    def __init__(self, certificate: Path, private_key: Path) -> None:
        self.certificate = certificate
        self.private_key = private_key
        self._options = _load(certificate, private_key)

    def reload(self) -> None:
        """Read the files again; blocking. On error the old certificate stays."""
        self._options = _load(self.certificate, self.private_key)

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._options.getContext(), None)

    def __repr__(self) -> str:
        return f"ServerTLS({str(self.certificate)!r})"


def client_options(host: str, ca_pem: bytes | None) -> Any:
    """TLS for connections the proxy makes: verify the peer against ``ca_pem``
    (the system's trust store if None) and the name ``host``."""
    trust = None
    if ca_pem:
        marker = b"-----END CERTIFICATE-----"
        certificates = [
            ssl.Certificate.loadPEM(part + marker)
            for part in ca_pem.split(marker)
            if b"BEGIN CERTIFICATE" in part
        ]
        trust = ssl.trustRootFromCertificates(certificates)
    return ssl.optionsForClientTLS(host, trustRoot=trust)


# What is read out of OpenSSL at a time: four records, below glibc's mmap
# threshold (proxy.runner.give_memory_back), so that the buffer comes from
# the heap and not from a fresh mapping, page faults and all, every time.
RECORDS_READ = 4 * (16384 + 256)


class RelayTLS(BufferingTLSTransport):
    """Twisted's TLS layer (small writes still gathered into one per reactor
    turn), writing a chunk in one go: Twisted's hands OpenSSL 16 KiB at a
    time, copying the rest of the chunk each time, and reads each record out
    and queues it on its own. Here the chunk is passed as a view, OpenSSL
    makes its records (16 KiB each, as before), and they are read out and
    sent together (:func:`proxy.transports.write_now`). Errors and writes
    before the handshake take Twisted's own paths."""

    def _write(self, bytes: bytes) -> None:  # noqa: A002 (Twisted's name)
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        view = memoryview(bytes)
        done = 0
        while done < len(view):
            try:
                done += connection.send(view[done:])
            except SSL.WantReadError:
                self._send_records()
                self._bufferedWrite(view[done:].tobytes())
                return
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                return
        self._send_records()

    def _send_records(self) -> None:
        records = []
        while True:
            try:
                records.append(self._tlsConnection.bio_read(RECORDS_READ))
            except SSL.WantReadError:
                break
        if records:
            write_now(self.transport, records)


def faster_tls(transport: Any) -> None:
    """After ``transport.startTLS``: the TLS layer Twisted put under the
    protocol writes as :class:`RelayTLS` does (the same class, one method
    more)."""
    layer = getattr(transport, "protocol", None)
    if type(layer) is BufferingTLSTransport:
        layer.__class__ = RelayTLS
