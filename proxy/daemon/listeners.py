"""The listeners: opening one (TLS, its backend, the front end, the port),
the reload's diff of old and new, and the drain at stop."""

from __future__ import annotations

import os
import socket
import urllib.parse
from typing import Any

import attrs
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.logger import Logger

from proxy import config as configuration, protocols
from proxy.backends import backend_endpoint
from proxy.backends.tokens import ClientCredentials, Grant, OAuthLogin, TokenCache
from proxy.webclient import agent as token_agent
from proxy.bootstrap import StartupError, read_password
from proxy.daemon.tree import Ordered, Part
from proxy.frontends.base import PreLoginBudget
from proxy.metrics import Metrics
from proxy.threads import Pool
from proxy.tls import ServerTLS, TLSFilesError
from proxy.transports import ProxyHeaderFactory, listen_reusing_port

log = Logger(namespace="legacy_auth_proxy.service")

# After the grace, the sessions' goodbyes leave, and TLS closes, within this.
CLOSE_DEADLINE = 3.0


class Listeners:
    """The open listeners, and every front end that still holds sessions
    (one closed by a reload keeps its sessions until they end)."""

    def __init__(self, *, reactor: Any, tree: Ordered, files_pool: Pool, core: Any,
                 budget: PreLoginBudget, metrics: Metrics,
                 sockets: dict[str, tuple[int, int]] | None = None,
                 reuse_ports: bool = False) -> None:
        self._reactor = reactor
        # A worker's: the sockets its supervisor opened, by endpoint (each
        # adopted anew by each listener on that endpoint; the inherited
        # descriptor stays open), and whether an endpoint it did not open
        # (one a reload added) is bound with SO_REUSEPORT, as every worker does.
        self._sockets = sockets or {}
        self._reuse_ports = reuse_ports
        self._tree = tree
        self._files_pool = files_pool
        self._core = core  # authenticator, sessions, upstream
        self._budget = budget
        self._metrics = metrics
        self.open: list[tuple[configuration.ListenerConfig, Any, ServerTLS | None]] = []
        self.frontends: list[Any] = []
        self._parts: dict[configuration.ListenerConfig, Part] = {}
        self._fqdn: str | None = None
        # backend_login: oauth2: one token cache for every listener, by the
        # token endpoint's CA (an HTTP client trusting it), keyed by grant.
        self._tokens: dict[bytes | None, TokenCache] = {}

    def __len__(self) -> int:
        """How many listeners are open."""
        return len(self.open)

    async def listen(self, config: configuration.ListenerConfig) -> None:
        from twisted.internet.endpoints import serverFromString
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from proxy.tls import RelayTLS

        tls = None
        if config.tls != "none":
            assert config.certificate is not None and config.private_key is not None
            try:
                tls = await self._files_pool.submit(ServerTLS, config.certificate, config.private_key)
            except TLSFilesError as e:
                raise StartupError(f"listener {config.label}: {e}") from None
        entry = protocols.REGISTRY[config.protocol]
        if entry.backend is None:
            backend: Any = self._core.upstream
        else:
            backend = entry.load("backend")(**await self._backend_options(config))
            await backend.ready()
        frontend: Any = entry.load("frontend")(
            backend=backend, reactor=self._reactor, config=config,
            authenticator=self._core.authenticator, sessions=self._core.sessions, tls=tls,
            budget=self._budget, metrics=self._metrics)
        factory = frontend
        if config.tls == "implicit":
            factory = TLSMemoryBIOFactory(tls, False, frontend)
            factory.protocol = RelayTLS
        if config.proxy_protocol:
            # Outermost: the balancer's header comes before TLS.
            factory = ProxyHeaderFactory(factory, config.trusted_proxies, self._reactor)
        try:
            inherited = self._sockets.get(config.endpoint)
            if inherited is not None:
                port = self._reactor.adoptStreamPort(inherited[0], inherited[1], factory)
            elif config.reuse_port or (
                    self._reuse_ports and config.endpoint.startswith(("tcp:", "tcp6:"))):
                port = listen_reusing_port(self._reactor, config.endpoint, factory)
            else:
                port = await serverFromString(self._reactor, config.endpoint).listen(factory)
        except Exception as e:
            if entry.backend is not None:
                backend.stop()
            raise StartupError(f"listener {config.label}: cannot listen: {e}") from None
        # Metrics follow it while it listens, and after a reload closed it,
        # while it still holds sessions.
        self.frontends = [f for f in self.frontends
                          if f.open_connections() or f.config in self._parts] + [frontend]
        self.open.append((config, port, tls))

        def stop() -> Any:
            if entry.backend is not None:
                backend.stop()  # its pooled connections
            return port.stopListening()

        self._parts[config] = self._tree.part(f"listener {config.label}", stop=stop)
        log.info("listening: {label} ({protocol}, {realm}, TLS {tls})", label=config.label,
                 protocol=config.protocol, realm=config.realm, tls=config.tls)

    async def reload(self, old: tuple[configuration.ListenerConfig, ...],
                     new: tuple[configuration.ListenerConfig, ...]) -> None:
        """Listeners removed or changed stop taking connections (their
        sessions go on); new or changed ones open. One that cannot open is
        logged, and the others are kept."""
        for config in [c for c in old if c not in new]:
            part = self._parts.pop(config, None)
            if part is None:
                continue  # it never opened
            await maybeDeferred(part.disownServiceParent)
            self.open = [entry for entry in self.open if entry[0] != config]
            log.info("stopped listening: {label} (its sessions go on)", label=config.label)
        # A worker's inherited socket no listener uses any more: closed, or
        # the kernel would go on queueing connections no one takes.
        for endpoint in [e for e in self._sockets if e not in {c.endpoint for c in new}]:
            os.close(self._sockets.pop(endpoint)[0])
        for config in [c for c in new if c not in old]:
            try:
                await self.listen(config)
            except StartupError as e:
                log.error("reload: {error}", error=str(e))

    async def reload_certificates(self) -> None:
        for listener, _, tls in self.open:
            if tls is not None:
                try:
                    await self._files_pool.submit(tls.reload)
                except TLSFilesError as e:
                    log.error("listener {label}: keeping the old certificate: {error}",
                              label=listener.label, error=str(e))
        await self._reload_client_secrets()

    async def _reload_client_secrets(self) -> None:
        """backend_login: oauth2: each open listener's client secret read
        again, as its certificate is, so that a secret rotated at the
        provider (Entra's expire) is taken with a reload; a new secret is a
        new grant, whose first login asks for a token with it."""
        open_now = {id(config) for config, _, _ in self.open}
        for frontend in self.frontends:
            config = frontend.config
            oauth = getattr(frontend.backend, "oauth", None)
            if oauth is None or id(config) not in open_now:
                continue
            try:
                secret = await self._files_pool.submit(
                    read_password, config.oauth2_client_secret_file, "oauth2_client_secret_file")
            except StartupError as e:
                log.error("listener {label}: keeping the old client secret: {error}",
                          label=config.label, error=str(e))
                continue
            if secret != oauth.grant.client_secret:
                oauth.grant = attrs.evolve(oauth.grant, client_secret=secret)
                log.info("listener {label}: a new OAuth client secret", label=config.label)

    def _connections(self) -> list[Any]:
        return [c for f in self.frontends for c in f.open_connections()]

    async def _gone(self, timeout: float) -> None:
        """Until every front end's connections are gone, or ``timeout``."""
        everyone = gatherResults([f.when_empty() for f in self.frontends])
        everyone.addTimeout(timeout, self._reactor)
        try:
            await everyone
        except Exception:
            pass  # the time is up (TimeoutError) or cancelled: what is left goes

    async def drain(self, grace: float) -> None:
        """The listeners take no more connections: close those not signed in
        now, give signed-in sessions ``grace`` seconds to finish, then tell
        the rest goodbye in their protocol's way."""
        for connection in self._connections():
            if not connection.username:
                connection.shut_down()
        if self._connections():
            log.info("waiting up to {grace} s for {count} session(s) to finish",
                     grace=grace, count=len(self._connections()))
            await self._gone(grace)
        for connection in self._connections():
            connection.shut_down()
        if self._connections():
            await self._gone(CLOSE_DEADLINE)

    async def _oauth(self, config: configuration.ListenerConfig) -> OAuthLogin:
        """backend_login: oauth2: the grant, from the client's secret file,
        and the cache its tokens are kept in."""
        assert config.oauth2_token_url and config.oauth2_client_id and config.oauth2_client_secret_file

        def read() -> tuple[str, bytes | None]:
            try:
                secret = read_password(config.oauth2_client_secret_file, "oauth2_client_secret_file")
                ca = None
                if config.oauth2_ca_file is not None:
                    try:
                        ca = config.oauth2_ca_file.read_bytes()
                    except OSError as e:
                        raise StartupError(f"{config.oauth2_ca_file}: oauth2_ca_file: cannot read: "
                                           f"{e.strerror}") from None
            except StartupError as e:
                raise StartupError(f"listener {config.label}: {e}") from None
            return secret, ca

        secret, ca = await self._files_pool.submit(read)
        cache = self._tokens.get(ca)
        if cache is None:
            metrics = self._metrics

            def failed(grant: Any, reason: str) -> None:
                log.warn("no access token from {url} for {client}: {reason}",
                         url=grant.token_url, client=grant.client_id, reason=reason)
                if metrics is not None:
                    metrics.token_failure(reason)

            client = ClientCredentials(self._reactor, token_agent(self._reactor, ca, config.backend_timeout),
                                       timeout=config.backend_timeout)
            cache = self._tokens[ca] = TokenCache(self._reactor, client.fetch, on_failure=failed)
        parts = urllib.parse.urlsplit(config.backend or "")
        return OAuthLogin(
            cache=cache,
            grant=Grant(config.oauth2_token_url, config.oauth2_client_id, secret,
                        config.oauth2_scope or "", config.oauth2_client_auth),
            mechanism=config.oauth2_mechanism.upper(),
            host=parts.hostname or "",
            port=parts.port or protocols.BACKEND_PORTS.get(parts.scheme),
        )

    async def _backend_options(self, config: configuration.ListenerConfig) -> dict[str, Any]:
        """What the IMAP and SMTP backends share: where, TLS, the master user."""
        assert config.backend is not None

        def read() -> tuple[str, bytes | None]:
            password = ""
            if config.master_password_file is not None:
                try:
                    password = read_password(config.master_password_file, "master_password_file")
                except StartupError as e:
                    raise StartupError(f"listener {config.label}: {e}") from None
            ca = None
            if config.backend_ca_file is not None:
                try:
                    ca = config.backend_ca_file.read_bytes()
                except OSError as e:
                    raise StartupError(
                        f"listener {config.label}: {config.backend_ca_file}: "
                        f"backend_ca_file: cannot read: {e.strerror}"
                    ) from None
            return password, ca

        password, ca = await self._files_pool.submit(read)
        endpoint, options = backend_endpoint(self._reactor, config.backend, ca, config.backend_timeout)
        if self._fqdn is None:
            self._fqdn = await self._files_pool.submit(socket.getfqdn)
        oauth = None
        if config.backend_login == "oauth2":
            oauth = await self._oauth(config)
        return dict(
            oauth=oauth,
            reactor=self._reactor,
            endpoint=endpoint,
            starttls=options if config.backend_starttls else None,
            master_user=config.master_user,
            master_password=password,
            login_style=config.backend_login,
            pass_client_address=config.pass_client_address,
            timeout=config.backend_timeout,
            pool_size=config.backend_pool,
            pool_max_age=config.backend_pool_max_age,
            hostname=self._fqdn,
        )
