"""Logging in to backend servers as the user, and relaying the session."""

from __future__ import annotations

import urllib.parse
from typing import Any

from twisted.internet import endpoints

from proxy.tls import client_options

DEFAULT_PORTS = {"imap": 143, "imaps": 993, "smtp": 587, "smtps": 465}


def backend_endpoint(reactor: Any, url: str, ca_pem: bytes | None, timeout: float) -> tuple[Any, Any]:
    """The endpoint for a backend URL, and the TLS options for its host (used
    for implicit TLS here, or by the caller for STARTTLS)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    options = client_options(host, ca_pem)
    endpoint = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if parts.scheme.endswith("s"):
        endpoint = endpoints.wrapClientTLS(options, endpoint)
    return endpoint, options
