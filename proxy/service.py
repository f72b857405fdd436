"""Builds the daemon from a validated config, runs it, reloads it on SIGHUP.

The entry point (:func:`proxy.cli.main`) hands in the reactor; nothing below
imports the global one.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from proxy import apppasswords, config as configuration
from proxy.admin import Admin
from proxy.audit import AuditLog
from proxy.auth.authenticator import Authenticator
from proxy.bootstrap import (
    StartupError,
    StoreUnreachable,
    _read_password as read_password,
    hash_parameters,
    open_state,
    read_directory_secrets,
)
from proxy.directory import Directory, client_endpoint, tls_options
from proxy.backends import backend_endpoint
from proxy.backends.ldap import Upstream
from proxy import protocols
from proxy.metrics import Metrics, counter, gauge, site
from proxy.frontends.base import PreLoginBudget
from proxy.sessions import Sessions
from proxy.tls import ServerTLS, TLSFilesError
from proxy.transports import ProxyHeaderFactory, listen_reusing_port
from proxy.threads import Pool, Threaded

log = Logger(namespace="legacy_auth_proxy.service")


def sd_notify(state: str) -> None:
    """Tell systemd how the service is (``READY=1``, ``RELOADING=1``, …), if it asked."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), address)
        except OSError as e:
            log.warn("cannot notify systemd: {error}", error=e.strerror)


SWEEP_INTERVAL = 3600.0
FEED_SAFETY_POLL = 30.0  # while the store announces changes: a poll now and then all the same


class _FromThread:
    """Audit events recorded by :class:`Admin` on the store's thread,
    handed to the reactor thread's :meth:`Daemon.record`."""

    def __init__(self, reactor: Any, record: Any) -> None:
        self._reactor = reactor
        self._record = record

    def record(self, event: str, **fields: Any) -> None:
        self._reactor.callFromThread(self._record, event, **fields)

    def close(self) -> None:
        pass


class Ordered(MultiService):
    """Children start in the order they are added and stop in the reverse
    order, each stop finished before the next begins: the listeners stop
    taking connections before the core writes what it holds, the audit log
    is written before the store closes, and the pools stop last."""

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)

        async def stop() -> None:
            for child in reversed(list(self)):
                try:
                    await maybeDeferred(child.stopService)
                except Exception:
                    log.failure("{name} did not stop cleanly", name=child.name)

        return Deferred.fromCoroutine(stop())


class Part(Service):
    """One part of the daemon in the tree: what starts it and what stops it."""

    def __init__(self, name: str, start: Any = None, stop: Any = None) -> None:
        self.name = name
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        super().startService()
        if self._start is not None:
            self._start()

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        return maybeDeferred(self._stop) if self._stop is not None else None


class Daemon:
    """The running proxy: its config, pools, store and audit log, as a tree
    of services (:attr:`services`) started in order and stopped in reverse."""

    def __init__(self, reactor: Any, config_path: Path, config: configuration.Config) -> None:
        self._reactor = reactor
        self._config_path = config_path
        self.config = config
        # SQLite: one thread (its connection is not shared); PostgreSQL: one
        # per pooled connection.
        self.store_pool = Pool(reactor, "store", queue=10_000,
                               threads=config.store.pool_size if config.store.url else 1)
        self.audit_pool = Pool(reactor, "audit", threads=1, queue=10_000)
        self.hash_pool = Pool(
            reactor, "argon2", threads=config.hashing.thread_count, queue=config.hashing.queue
        )
        self.audit = AuditLog(config.audit.file, reactor.seconds)
        self._audit_batch: list[Any] = []  # JSON lines, or events to make into lines
        self.store: Any = None
        self.pepper = b""
        self.files_pool = Pool(reactor, "files", threads=1, queue=1000)
        self.directory: Directory | None = None
        self.authenticator: Authenticator | None = None
        self.sessions: Sessions | None = None
        self._upstream: Upstream | None = None
        self.listeners: list[tuple[configuration.ListenerConfig, Any, ServerTLS | None]] = []
        self._fqdn: str | None = None
        self.budget = PreLoginBudget(config.limits.max_connections_before_login,
                                     config.limits.max_bytes_before_login,
                                     config.limits.max_connections)
        self.services = Ordered()
        self.frontends: list[Any] = []  # the listeners' factories, for metrics
        self._listener_parts: dict[configuration.ListenerConfig, Part] = {}
        self.metrics = Metrics()
        self.metrics.watch(self._state)
        self.portal: Any = None
        self.portal_tls: ServerTLS | None = None
        self.feed_listening = False

    def _part(self, name: str, start: Any = None, stop: Any = None) -> Part:
        """Add a part to the tree; it starts at once (the tree is running)."""
        part = Part(name, start, stop)
        part.setServiceParent(self.services)
        return part

    async def start(self) -> None:
        self.services.startService()
        pools = (self.store_pool, self.audit_pool, self.hash_pool, self.files_pool)

        def stop_pools() -> None:
            for pool in pools:
                pool.stop()

        self._part("pools", start=lambda: [pool.start() for pool in pools], stop=stop_pools)
        state = await self.store_pool.submit(open_state, self.config)
        self._state_store = state.store  # for Admin, on the store's thread only
        self.store = Threaded(state.store, self.store_pool)
        self.pepper = state.pepper
        # Closed on the store's own thread, after whatever is queued there.
        self._part("store", stop=lambda: self.store_pool.submit(state.store.close))
        self._part("audit", stop=self._write_audit)
        if self.config.directory is not None:
            await self._start_authentication(self.config.directory)
            if hasattr(state.store, "listen"):
                self._listen_for_changes(state.store)
            # Stopped after the listeners stop taking connections.
            self._part("sessions", stop=lambda: Deferred.fromCoroutine(self._drain()))
            for listener in self.config.listeners:
                await self._listen(listener)
        if self.config.metrics.endpoint is not None:
            await self._serve_metrics(self.config.metrics.endpoint)
        if self.config.portal.endpoint is not None:
            await self._serve_portal()
        self.record("daemon_started", config=str(self._config_path))
        log.info(
            "legacy-auth-proxy started: store {store}, directory {directory}",
            store=getattr(state.store, "where", None) or str(self.config.store.path),
            directory=self.config.directory.url if self.config.directory else "none",
        )

    async def _start_authentication(self, config: configuration.DirectoryConfig) -> None:
        password, search_password, ca = await self.store_pool.submit(read_directory_secrets, config)
        self.directory = Directory(self._reactor, config, password, ca)
        self.directory.start()
        self.authenticator = Authenticator(
            clock=self._reactor,
            policy=self.config.policy,
            throttle=self.config.throttle,
            cache=self.config.cache,
            directory_config=config,
            directory=self.directory,
            store=self.store,
            hash_pool=self.hash_pool,
            hasher=apppasswords.Hasher(hash_parameters(self.config)),
            pepper=self.pepper,
            record=self.record,
            metrics=self.metrics,
            max_sessions=self.config.limits.max_sessions_per_user_and_source,
            shared_failures=self.config.throttle.shared
            if self.config.throttle.shared is not None else self.config.store.url is not None,
        )
        self.directory.metrics = self.metrics
        await self.authenticator.start()
        self.sessions = Sessions(
            self._reactor, self.directory, config.account_cache, self.authenticator
        )
        self.authenticator.on_revoked(self.sessions.revoked)
        self.authenticator.sessions = self.sessions
        self.sessions.start()
        self._upstream = Upstream(
            reactor=self._reactor,
            config=config,
            endpoint=client_endpoint(self._reactor, config, tls_options(config, ca)),
            start_tls=tls_options(config, ca)
            if config.start_tls and config.url.startswith("ldap://")
            else None,
            service_password=password,
            search_password=search_password,
        )
        authenticator, directory, sessions = self.authenticator, self.directory, self.sessions

        async def stop() -> None:
            sessions.stop()
            await authenticator.stop()
            await directory.stop()

        self._part("authentication", stop=lambda: Deferred.fromCoroutine(stop()))
        from twisted.internet.task import LoopingCall

        sweeping = LoopingCall(self._sweep)
        sweeping.clock = self._reactor
        self._part("sweep", start=lambda: sweeping.start(SWEEP_INTERVAL, now=True),
                   stop=lambda: sweeping.running and sweeping.stop())
        # argon2's memory, kept between runs while sign-ins need it.
        releasing = LoopingCall(apppasswords.release_idle_memory)
        releasing.clock = self._reactor
        self._part("argon2 memory", start=lambda: releasing.start(30, now=False),
                   stop=lambda: releasing.running and releasing.stop())

    def _listen_for_changes(self, store: Any) -> None:
        """A store that announces changes (PostgreSQL's NOTIFY): read the
        feed when told, so a deletion on any node takes effect here at once;
        poll every second only while the announcements are cut off, and
        catch up whenever they resume, so nothing is missed."""
        import threading

        stop = threading.Event()
        authenticator = self.authenticator
        assert authenticator is not None

        def changed() -> None:
            Deferred.fromCoroutine(authenticator.poll_changes())

        def listening(up: bool) -> None:
            if up != self.feed_listening:
                log.info("change feed: {state}", state="announced by the store" if up
                         else "not announced (connection lost): polling every second")
            self.feed_listening = up
            authenticator.poll_every(FEED_SAFETY_POLL if up else 1.0)
            if up:
                changed()

        thread = threading.Thread(
            target=store.listen, name="change-feed", daemon=True,
            args=(lambda: self._reactor.callFromThread(changed),
                  lambda up: self._reactor.callFromThread(listening, up), stop))

        def halt() -> Deferred[Any]:
            stop.set()
            return self.files_pool.submit(thread.join, 5.0)

        self._part("change feed", start=thread.start, stop=halt)

    def admin(self, actor: str) -> Admin:
        """The rules of app passwords and users (:class:`proxy.admin.Admin`)
        for the portal and the sweep: call its methods on the store pool."""
        return Admin(
            store=self._state_store,
            hasher=apppasswords.Hasher(hash_parameters(self.config)),
            pepper=self.pepper,
            audit=_FromThread(self._reactor, self.record),
            policy=self.config.policy,
            clock=self._reactor.seconds,
            actor=actor,
        )

    async def _sweep(self) -> None:
        """App passwords that expired or went unused are marked stopped (and
        their sessions end); those stopped 30 days ago are forgotten."""
        try:
            stopped = await self.store_pool.submit(self.admin("sweep").sweep)
        except Exception:
            log.failure("cannot sweep the store")
            return
        if stopped and self.authenticator is not None:
            await self.authenticator.poll_changes()

    async def _serve_portal(self) -> None:
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.task import LoopingCall
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from proxy.portal.app import Portal
        from proxy.secondfactor import KeyBox

        config = self.config.portal
        assert config.certificate is not None and config.private_key is not None
        try:
            keybox = await self.store_pool.submit(
                KeyBox.load, self.config.store.totp_key_path, create=True)
        except apppasswords.PepperError as e:
            raise StartupError(f"store.totp_key_file: {e}") from None
        try:
            tls = await self.files_pool.submit(ServerTLS, config.certificate, config.private_key)
        except TLSFilesError as e:
            raise StartupError(f"portal: {e}") from None
        hasher = apppasswords.Hasher(hash_parameters(self.config))
        # Built on the files pool: it reads its templates and static files.
        self.portal = await self.files_pool.submit(functools.partial(
            Portal, reactor=self._reactor, config=lambda: self.config,
            authenticator=self.authenticator,
            admin=self.admin, store_pool=self.store_pool, files_pool=self.files_pool,
            keybox=keybox, record=self.record,
            hash_secret=lambda secret: self.hash_pool.submit(hasher.hash, secret),
        ))
        sessions = self.portal.sessions

        def revoked(username: str, app_password_id: str | None, kind: str) -> None:
            # What ends a user's sessions everywhere ends their page sessions too.
            if kind in ("account_inactive", "password_change", "second_factor_reset"):
                sessions.end_user(username)

        assert self.authenticator is not None
        self.authenticator.on_revoked(revoked)
        factory: Any = TLSMemoryBIOFactory(tls, False, self.portal.site())
        if config.proxy_protocol:
            factory = ProxyHeaderFactory(factory, config.trusted_proxies, self._reactor)
        try:
            port = await serverFromString(self._reactor, config.endpoint).listen(factory)
        except Exception as e:
            raise StartupError(f"portal.endpoint: cannot listen: {e}") from None
        self.portal_tls = tls
        expiring = LoopingCall(self.portal.sessions.expire)
        expiring.clock = self._reactor
        self._part("portal", start=lambda: expiring.start(60, now=False),
                   stop=lambda: (expiring.running and expiring.stop(), port.stopListening())[1])
        log.info("portal on {endpoint}", endpoint=config.endpoint)

    async def _listen(self, config: configuration.ListenerConfig) -> None:
        from twisted.internet.endpoints import serverFromString
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from proxy.tls import RelayTLS

        tls = None
        if config.tls != "none":
            assert config.certificate is not None and config.private_key is not None
            try:
                tls = await self.files_pool.submit(ServerTLS, config.certificate, config.private_key)
            except TLSFilesError as e:
                raise StartupError(f"listener {config.label}: {e}") from None
        common = dict(
            reactor=self._reactor,
            config=config,
            authenticator=self.authenticator,
            sessions=self.sessions,
            tls=tls,
            budget=self.budget,
            metrics=self.metrics,
        )
        entry = protocols.REGISTRY[config.protocol]
        if entry.backend is None:
            backend: Any = self._upstream
        else:
            backend = entry.load("backend")(**await self._backend_options(config))
            await backend.ready()
        frontend: Any = entry.load("frontend")(backend=backend, **common)
        factory = frontend
        if config.tls == "implicit":
            factory = TLSMemoryBIOFactory(tls, False, frontend)
            factory.protocol = RelayTLS
        if config.proxy_protocol:
            # Outermost: the balancer's header comes before TLS.
            factory = ProxyHeaderFactory(factory, config.trusted_proxies, self._reactor)
        try:
            if config.reuse_port:
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
                          if f.connections or f.config in self._listener_parts] + [frontend]
        self.listeners.append((config, port, tls))
        def stop() -> Any:
            if entry.backend is not None:
                backend.stop()  # its pooled connections
            return port.stopListening()

        self._listener_parts[config] = self._part(f"listener {config.label}", stop=stop)
        log.info("listening: {label} ({protocol}, {realm}, TLS {tls})", label=config.label,
                 protocol=config.protocol, realm=config.realm, tls=config.tls)

    async def _reload_listeners(self, old: tuple[configuration.ListenerConfig, ...],
                                new: tuple[configuration.ListenerConfig, ...]) -> None:
        """Listeners removed or changed stop taking connections (their
        sessions go on); new or changed ones open. One that cannot open is
        logged, and the others are kept."""
        if self.config.directory is None:
            return
        for config in [c for c in old if c not in new]:
            part = self._listener_parts.pop(config, None)
            if part is None:
                continue  # it never opened
            await maybeDeferred(part.disownServiceParent)
            self.listeners = [entry for entry in self.listeners if entry[0] != config]
            log.info("stopped listening: {label} (its sessions go on)", label=config.label)
        for config in [c for c in new if c not in old]:
            try:
                await self._listen(config)
            except StartupError as e:
                log.error("reload: {error}", error=str(e))

    async def _drain(self) -> None:
        """The listeners take no more connections: close those not signed in
        now, give signed-in sessions ``shutdown.grace`` to finish, then tell
        the rest goodbye in their protocol's way."""
        from twisted.internet.task import deferLater

        def open_connections() -> list[Any]:
            return [c for f in self.frontends for c in list(f.connections)]

        for connection in open_connections():
            if not connection.username:
                connection.shut_down()
        grace = self.config.shutdown.grace
        if open_connections():
            log.info("waiting up to {grace} s for {count} session(s) to finish",
                     grace=grace, count=len(open_connections()))
        waited = 0.0
        while open_connections() and waited < grace:
            await deferLater(self._reactor, 0.1)
            waited += 0.1
        for connection in open_connections():
            connection.shut_down()
        # Their goodbyes leave, and TLS closes, within the close deadline.
        waited = 0.0
        while open_connections() and waited < 3.0:
            await deferLater(self._reactor, 0.1)
            waited += 0.1

    async def _serve_metrics(self, endpoint: str) -> None:
        from twisted.internet.endpoints import serverFromString

        try:
            port = await serverFromString(self._reactor, endpoint).listen(
                site(self.metrics, self.not_ready))
        except Exception as e:
            raise StartupError(f"metrics.endpoint: cannot listen: {e}") from None
        self._part("metrics", stop=port.stopListening)
        log.info("metrics and health on {endpoint}", endpoint=endpoint)

    def not_ready(self) -> list[str]:
        """Why a load balancer should not send clients here now (empty: ready)."""
        problems = []
        if len(self.listeners) < len(self.config.listeners):
            problems.append("not every listener is open")
        now = self._reactor.seconds()
        if self.authenticator is not None and self.config.store.url is None:
            # A shared store's outage is every node's alike: taking them all
            # out of the balancer would end what cached sign-ins still allow.
            ok_at = self.authenticator.store_ok_at
            if ok_at is None or now - ok_at > 10:
                problems.append("the store does not answer")
        if self.directory is not None and self.config.directory is not None:
            since = self.directory.down_since()
            if since is not None and now - since > self.config.directory.outage_grace:
                problems.append("the directory does not answer, past the outage grace")
            # A pool that cannot serve fails sign-ins on this node alone,
            # whatever the directory does: no grace for that.
            problems.extend(self.directory.pool_problems())
        return problems

    def _state(self) -> Any:
        """What the metrics read when Prometheus scrapes."""
        # By label: a listener changed by a reload may have two factories
        # for a while, the old one finishing its sessions.
        connections: dict[str, int] = {}
        sessions: dict[str, int] = {}
        relayed: dict[tuple[str, str], int] = {}
        paths: dict[tuple[str, str], int] = {}
        for f in list(self.frontends):
            label = f.config.label
            connections[label] = connections.get(label, 0) + len(f.connections)
            sessions[label] = sessions.get(label, 0) + sum(1 for c in f.connections if c.username)
            for i, direction in enumerate(("to_backend", "to_client")):
                relayed[label, direction] = relayed.get((label, direction), 0) + f.relayed[i]
            for i, path in enumerate(("kernel", "python")):
                paths[label, path] = paths.get((label, path), 0) + f.relay_paths[i]
        yield gauge("connections", "Client connections open", ["listener"],
                    [([k], v) for k, v in connections.items()])
        yield gauge("sessions", "Signed-in sessions", ["listener"],
                    [([k], v) for k, v in sessions.items()])
        yield counter("relayed_bytes", "Bytes relayed after sign-in", ["listener", "direction"],
                      [(list(k), v) for k, v in relayed.items()])
        yield counter("relayed_sessions", "Sessions relayed after sign-in, by how: in the kernel "
                      "(splice, plain TCP on both sides) or in Python", ["listener", "path"],
                      [(list(k), v) for k, v in paths.items()])
        pools = (self.store_pool, self.audit_pool, self.hash_pool, self.files_pool)
        yield gauge("pool_calls", "Calls under way or waiting in a thread pool", ["pool"],
                    [([p.name], p.pending) for p in pools])
        yield gauge("pool_capacity", "Calls a thread pool takes before it answers busy", ["pool"],
                    [([p.name], p.limit) for p in pools])
        yield counter("pool_refusals", "Calls a full thread pool refused", ["pool"],
                      [([p.name], p.refused) for p in pools])
        yield gauge("connections_before_login", "Connections not signed in, over all listeners",
                    [], [([], self.budget.connections)])
        yield gauge("bytes_before_login", "Bytes held for connections not signed in", [],
                    [([], self.budget.bytes)])
        if self.directory is not None:
            yield gauge("directory_up", "1 if the directory answered when last asked", [],
                        [([], 1 if self.directory.up() else 0)])
        if self.authenticator is not None:
            yield gauge("lockouts", "Account lockouts in force", [],
                        [([], self.authenticator.throttle.lockouts_in_force())])
        yield gauge("backend_up", "1 if the last login to the backend as a user worked",
                    ["listener"], [([k], 1 if v else 0) for k, v in self.metrics.backend_up.items()])
        if self.config.store.url is not None:
            yield gauge("change_feed_listening",
                        "1 while the shared store announces changes (LISTEN/NOTIFY); 0: polling", [],
                        [([], 1 if self.feed_listening else 0)])
        yield gauge("ready", "1 if the daemon is ready for clients (/health/ready)", [],
                    [([], 0 if self.not_ready() else 1)])

    async def _backend_secrets(self, config: configuration.ListenerConfig) -> tuple[str, bytes | None]:
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

        return await self.files_pool.submit(read)

    async def _backend_options(self, config: configuration.ListenerConfig) -> dict[str, Any]:
        """What the IMAP and SMTP backends share: where, TLS, the master user."""
        assert config.backend is not None
        password, ca = await self._backend_secrets(config)
        endpoint, options = backend_endpoint(self._reactor, config.backend, ca, config.backend_timeout)
        return dict(
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
            hostname=await self._hostname(),
        )

    async def _hostname(self) -> str:
        if self._fqdn is None:
            self._fqdn = await self.files_pool.submit(socket.getfqdn)
        return self._fqdn

    def record(self, event: str, **fields: Any) -> None:
        """One audit event: to the Twisted log now, to the file on the audit
        pool. Events of one reactor turn are written together, with one write."""
        record = self.audit.event(event, **fields)
        if event == "authentication" and not self.config.audit.log_authentications:
            # Every sign-in is an event: the file has them all; the daemon's
            # log has a line for each failure (for fail2ban) already. Its
            # JSON is made on the audit thread, off the sign-in's path.
            self._audit_batch.append(record)
        else:
            self._audit_batch.append(self.audit.log(record))
        if len(self._audit_batch) == 1:
            self._reactor.callLater(0, self._write_audit)

    def _write_audit(self) -> Deferred[None]:
        batch, self._audit_batch = self._audit_batch, []
        line = self.audit.line

        def write() -> None:
            self.audit.append_lines([r if isinstance(r, str) else line(r) for r in batch])

        return self.audit_pool.submit(write).addErrback(
            lambda f: log.failure("cannot write the audit log", f)
        )

    async def reload(self) -> None:
        """SIGHUP: read the config again; keep the running one if the new one is bad."""
        sd_notify("RELOADING=1")
        try:
            new = await self.store_pool.submit(configuration.load, self._config_path)
        except configuration.ConfigError as e:
            log.error("reload refused, keeping the running config: {error}", error=str(e))
            return
        fixed = ("store", "hashing", "directory", "throttle", "cache", "limits", "metrics",
                 "shutdown", "portal")
        unchanged = [s for s in fixed if getattr(new, s) != getattr(self.config, s)]
        if unchanged:
            log.warn(
                "settings of {sections} take effect at the next restart",
                sections=", ".join(unchanged),
            )
            new = attrs.evolve(new, **{s: getattr(self.config, s) for s in fixed})
        blocked_now = new.policy.block_legacy_auth and not self.config.policy.block_legacy_auth
        old_listeners = self.config.listeners
        self.config = new
        # Before any await: the audit pool runs its calls in order, so every
        # batch sent from here on is written to the new file (and the old
        # one, rotated by logrotate, is let go).
        reopened = self.audit_pool.submit(self.audit.reopen, new.audit.file)
        await self._reload_listeners(old_listeners, new.listeners)
        if self.authenticator is not None:
            self.authenticator.policy = new.policy
        if blocked_now and self.sessions is not None:
            self.sessions.end_all("legacy_blocked")
        await reopened
        for listener, _, tls in self.listeners:
            if tls is not None:
                try:
                    await self.files_pool.submit(tls.reload)
                except TLSFilesError as e:
                    log.error("listener {label}: keeping the old certificate: {error}",
                              label=listener.label, error=str(e))
        if self.portal_tls is not None:
            try:
                await self.files_pool.submit(self.portal_tls.reload)
            except TLSFilesError as e:
                log.error("portal: keeping the old certificate: {error}", error=str(e))
        self.record("config_reloaded", config=str(self._config_path))
        log.info("config reloaded from {path}", path=str(self._config_path))

    def install_signal_handlers(self) -> None:
        def reload() -> None:
            d = Deferred.fromCoroutine(self.reload())
            d.addErrback(lambda f: log.failure("reload failed, keeping the running config", f))
            d.addBoth(lambda _: sd_notify("READY=1"))

        def on_hup(signum: int, frame: Any) -> None:
            self._reactor.callFromThread(reload)

        stopping: list[int] = []

        def on_stop(signum: int, frame: Any) -> None:
            # Once: a second signal (a process group's, or a second Ctrl-C)
            # would otherwise stop a reactor that is already stopping.
            if stopping:
                return
            stopping.append(signum)
            self._reactor.callFromThread(self._stop, signal.Signals(signum).name)

        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)

    def _stop(self, name: str) -> None:
        log.info("{signal} received, stopping", signal=name)
        self._reactor.stop()


def watchdog(reactor: Any) -> Any:
    """systemd's watchdog (``WatchdogSec=``): ``WATCHDOG=1`` at half the
    interval it asked for, from the reactor thread, so that a reactor that
    stops turning (blocked, deadlocked) gets the daemon restarted. None if
    systemd asked for no watchdog."""
    from twisted.internet.task import LoopingCall

    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    loop = LoopingCall(sd_notify, "WATCHDOG=1")
    loop.clock = reactor
    loop.start(int(usec) / 2e6, now=True)
    return loop


async def serve(reactor: Any, config_path: Path, config: configuration.Config) -> None:
    """Run until the reactor stops (SIGTERM, SIGINT)."""
    daemon = Daemon(reactor, config_path, config)
    reactor.addSystemEventTrigger("before", "shutdown", daemon.services.stopService)
    await daemon.start()
    daemon.install_signal_handlers()
    sd_notify("READY=1")
    watchdog(reactor)
    stopped: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: stopped.callback(None))
    await stopped
