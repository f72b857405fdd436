"""The daemon's parts, built once from the config by one builder into
frozen records: the thread pools, and the core (the directory, the
authenticator, live sessions and the LDAP upstream) with its tree parts."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred

from proxy import apppasswords, config as configuration
from proxy.auth.authenticator import Authenticator
from proxy.auth.bearer import BearerTokens
from proxy.webclient import agent as token_agent, get_json
from proxy.backends.ldap import Upstream
from proxy.bootstrap import StartupError, hash_parameters, read_directory_secrets
from proxy.daemon.tree import Ordered
from proxy.directory import Directory, client_endpoint, tls_options
from proxy.metrics import Metrics
from proxy.sessions import Registry, Sessions
from proxy.threads import Pool

@attrs.frozen
class Pools:
    """The daemon's bounded thread pools."""

    store: Pool
    audit: Pool
    hashing: Pool
    files: Pool

    @classmethod
    def of(cls, reactor: Any, config: configuration.Config) -> Pools:
        return cls(
            # SQLite: one thread (its connection is not shared); PostgreSQL:
            # one per pooled connection.
            store=Pool(reactor, "store", queue=10_000,
                       threads=config.store.pool_size if config.store.url else 1),
            audit=Pool(reactor, "audit", threads=1, queue=10_000),
            hashing=Pool(reactor, "argon2", threads=config.hashing.thread_count,
                         queue=config.hashing.queue),
            files=Pool(reactor, "files", threads=1, queue=1000),
        )

    def all(self) -> tuple[Pool, ...]:
        return (self.store, self.audit, self.hashing, self.files)


@attrs.frozen
class Core:
    """Who decides sign-ins and what ends sessions: built together, started
    together, stopped together."""

    directory: Directory
    authenticator: Authenticator
    sessions: Sessions
    upstream: Upstream


async def bearer_tokens(reactor: Any, config: configuration.OAuthConfig, files: Pool) -> BearerTokens:
    """The checker of the access tokens clients sign in with (the oauth
    section), fetching the provider's keys with Twisted's HTTP client."""
    ca = None
    if config.ca_file is not None:
        path = config.ca_file

        def read() -> bytes:
            try:
                return path.read_bytes()
            except OSError as e:
                raise StartupError(f"{path}: oauth.ca_file: cannot read: {e.strerror}") from None

        ca = await files.submit(read)
    agent = token_agent(reactor, ca, 10.0)
    return BearerTokens(
        clock=reactor,
        fetch_keys=lambda: get_json(agent, reactor, config.jwks_url, 10.0),
        issuer=config.issuer,
        audiences=config.audiences,
        username_claims=config.username_claims,
        leeway=config.leeway,
    )


async def build_core(*, reactor: Any, config: configuration.Config, pools: Pools, store: Any,
                     pepper: bytes, record: Any, metrics: Metrics, tree: Ordered) -> Core:
    """The core over the opened store, started, its parts in ``tree``."""
    directory_config = config.directory
    assert directory_config is not None
    password, search_password, ca = await pools.store.submit(
        read_directory_secrets, directory_config)
    directory = Directory(reactor, directory_config, password, ca, metrics=metrics)
    directory.start()
    registry = Registry()  # the live sessions, counted by the core and ended by Sessions
    authenticator = Authenticator(
        clock=reactor,
        policy=config.policy,
        throttle=config.throttle,
        cache=config.cache,
        directory_config=directory_config,
        directory=directory,
        store=store,
        hash_pool=pools.hashing,
        hasher=apppasswords.Hasher(hash_parameters(config)),
        pepper=pepper,
        record=record,
        metrics=metrics,
        max_sessions=config.limits.max_sessions_per_user_and_source,
        shared_failures=config.throttle.shared
        if config.throttle.shared is not None
        else config.store.url is not None or config.workers != 1,
        sessions=registry,
    )
    if config.oauth is not None:
        authenticator.bearer = await bearer_tokens(reactor, config.oauth, pools.files)
    await authenticator.start()
    sessions = Sessions(reactor, directory, directory_config.account_cache, authenticator,
                        registry)
    authenticator.on_revoked(sessions.revoked)
    sessions.start()
    upstream = Upstream(
        reactor=reactor,
        config=directory_config,
        endpoint=client_endpoint(reactor, directory_config, tls_options(directory_config, ca)),
        start_tls=tls_options(directory_config, ca)
        if directory_config.start_tls and directory_config.url.startswith("ldap://")
        else None,
        service_password=password,
        search_password=search_password,
    )

    async def stop() -> None:
        sessions.stop()
        await authenticator.stop()
        await directory.stop()

    tree.part("authentication", stop=lambda: Deferred.fromCoroutine(stop()))
    from twisted.internet.task import LoopingCall

    # argon2's memory, kept between runs while sign-ins need it.
    releasing = LoopingCall(apppasswords.release_idle_memory)
    releasing.clock = reactor
    tree.part("argon2 memory", start=lambda: releasing.start(30, now=False),
              stop=lambda: releasing.running and releasing.stop())
    return Core(directory, authenticator, sessions, upstream)
