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
from zope.interface import implementer


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
