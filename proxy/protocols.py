"""The protocols the proxy speaks: one entry each, read by the config, the
daemon, the command line tool and the store. Adding a protocol is a front
end module, a backend module and one entry here.

This module imports nothing of the proxy's: the front end and backend are
named by their dotted paths and imported only by the daemon.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import attrs


# Listener settings every protocol has; each entry adds its own.
COMMON_SETTINGS = (
    "protocol", "realm", "endpoint", "name", "tls", "certificate", "private_key",
    "allow_plaintext_auth", "login_timeout", "idle_timeout", "max_connections_per_source",
    "proxy_protocol", "trusted_proxies", "reuse_port",
)
_MAIL = (
    "max_line_length", "max_bad_commands", "backend", "backend_starttls", "backend_ca_file",
    "backend_timeout", "backend_pool", "backend_pool_max_age", "backend_login", "master_user", "master_password_file",
    "pass_client_address", "oauth2_token_url", "oauth2_client_id", "oauth2_client_secret_file",
    "oauth2_scope", "oauth2_client_auth", "oauth2_mechanism", "oauth2_ca_file",
)


@attrs.frozen
class Protocol:
    name: str
    title: str
    # Where clients usually find it, by the listener's tls setting (for docs
    # and the demo; listeners always name their endpoint).
    ports: Mapping[str, int]
    # Backend URL schemes and their default ports; empty: the backend is the
    # upstream directory (LDAP).
    backend_ports: Mapping[str, int]
    # How the proxy may log in to the backend as the user (backend_login).
    backend_logins: tuple[str, ...]
    frontend: str  # "module:Listener class"
    backend: str | None  # "module:backend class"; None: the directory
    settings: tuple[str, ...] = ()  # listener settings of its own, beside COMMON_SETTINGS

    def load(self, what: str) -> Any:
        module, _, name = getattr(self, what).partition(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            name="ldap", title="LDAP", ports={"starttls": 389, "implicit": 636},
            backend_ports={}, backend_logins=(),
            frontend="proxy.frontends.ldap:LDAPListener", backend=None,
            settings=("allow_anonymous", "max_message_size_before_bind", "max_message_size",
                      "max_ber_depth"),
        ),
        Protocol(
            name="imap", title="IMAP", ports={"starttls": 143, "implicit": 993},
            backend_ports={"imap": 143, "imaps": 993}, backend_logins=("sasl", "dovecot", "oauth2"),
            frontend="proxy.frontends.imap:IMAPListener", backend="proxy.backends.imap:IMAPBackend",
            settings=_MAIL + ("max_literal_size",),
        ),
        Protocol(
            name="smtp", title="SMTP submission", ports={"starttls": 587, "implicit": 465},
            backend_ports={"smtp": 587, "smtps": 465}, backend_logins=("sasl", "xclient", "oauth2"),
            frontend="proxy.frontends.smtp:SMTPListener", backend="proxy.backends.smtp:SMTPBackend",
            settings=_MAIL,
        ),
        Protocol(
            name="pop3", title="POP3", ports={"starttls": 110, "implicit": 995},
            backend_ports={"pop3": 110, "pop3s": 995}, backend_logins=("sasl", "dovecot", "oauth2"),
            frontend="proxy.frontends.pop3:POP3Listener", backend="proxy.backends.pop3:POP3Backend",
            settings=_MAIL,
        ),
    )
}

NAMES = tuple(REGISTRY)
BACKEND_PORTS = {scheme: port for p in REGISTRY.values() for scheme, port in p.backend_ports.items()}


def backend_protocol(scheme: str) -> Protocol | None:
    """The protocol a backend URL scheme belongs to."""
    return next((p for p in REGISTRY.values() if scheme in p.backend_ports), None)
