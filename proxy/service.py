"""Builds the daemon from a validated config, runs it, reloads it on SIGHUP.

The entry point (:func:`proxy.cli.main`) hands in the reactor; nothing below
imports the global one. The parts, each with one job, are in
:mod:`proxy.daemon`; this module puts them together.
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from proxy import apppasswords, config as configuration
from proxy.admin import Admin
from proxy.audit import AuditLog
from proxy.bootstrap import StartupError, hash_parameters, open_state
from proxy.daemon import health, webhooks
from proxy.daemon.auditing import AuditBatches, FromThread
from proxy.daemon.build import Core, Pools, build_core
from proxy.daemon.listeners import Listeners
from proxy.daemon.supervisor import WorkerRole
from proxy.daemon.tree import Ordered, Part, sd_notify, watchdog
from proxy.frontends.base import PreLoginBudget
from proxy.metrics import Metrics, site
from proxy.threads import Threaded
from proxy.tls import ServerTLS, TLSFilesError
from proxy.transports import ProxyHeaderFactory

__all__ = ["Daemon", "Ordered", "Part", "sd_notify", "serve", "watchdog"]

log = Logger(namespace="legacy_auth_proxy.service")

SWEEP_INTERVAL = 3600.0
FEED_SAFETY_POLL = 30.0  # while the store announces changes: a poll now and then all the same


class Daemon:
    """The running proxy: its parts (:mod:`proxy.daemon`) as a tree of
    services (:attr:`services`) started in order and stopped in reverse,
    and what changes them: SIGHUP and the signals that stop it."""

    def __init__(self, reactor: Any, config_path: Path, config: configuration.Config,
                 role: WorkerRole | None = None) -> None:
        self._reactor = reactor
        self._config_path = config_path
        # One of several workers (proxy.daemon.supervisor): its metrics on
        # its own socket, the portal on worker 0 only, its supervisor's sockets.
        self._role = role
        self.config = role.applied(config) if role is not None else config
        self.pools = Pools.of(reactor, config)
        self.audit = AuditBatches(reactor, AuditLog(config.audit.file, reactor.seconds),
                                  self.pools.audit, config.audit.log_authentications)
        self.record = self.audit.record
        self.store: Any = None
        self.pepper = b""
        self.core: Core | None = None
        self.budget = PreLoginBudget(config.limits.max_connections_before_login,
                                     config.limits.max_bytes_before_login,
                                     config.limits.max_connections)
        self.services = Ordered()
        self.listeners: Listeners | None = None
        self.metrics = Metrics()
        self.metrics.watch(health.StateMetrics(
            metrics=self.metrics, config=lambda: self.config,
            frontends=lambda: self.listeners.frontends if self.listeners else (),
            pools=self.pools.all(), budget=self.budget, parts=lambda: self.core,
            feed_listening=lambda: self.feed_listening, ready=self.not_ready))
        self.portal: Any = None
        self.webhooks: webhooks.Webhooks | None = None
        self.portal_tls: ServerTLS | None = None
        self.feed_listening = False

    async def start(self) -> None:
        self.services.startService()
        pools = self.pools.all()

        def stop_pools() -> None:
            for pool in pools:
                pool.stop()

        self.services.part("pools", start=lambda: [pool.start() for pool in pools],
                           stop=stop_pools)
        state = await self.pools.store.submit(open_state, self.config)
        self._state_store = state.store  # for Admin, on the store's thread only
        self.store = Threaded(state.store, self.pools.store)
        self.pepper = state.pepper
        # Closed on the store's own thread, after whatever is queued there.
        self.services.part("store", stop=lambda: self.pools.store.submit(state.store.close))
        self.services.part("audit", stop=self.audit.write)
        if self.config.webhooks:
            # Stopped before the audit's last batch is written and the store
            # closes: the deliverers end their turns, the outbox is written.
            try:
                self.webhooks = await webhooks.open_webhooks(
                    reactor=self._reactor, config=self.config, store=state.store,
                    files_pool=self.pools.files, tree=self.services, metrics=self.metrics,
                    # One worker delivers (claims on SQLite are one deliverer's); all write.
                    deliver=self._role is None or self._role.index == 0)
            except webhooks.WebhookSetupError as e:
                raise StartupError(str(e)) from None
            self.audit.outbox = self.webhooks.writer.add
        if self.config.directory is not None:
            self.core = await build_core(
                reactor=self._reactor, config=self.config, pools=self.pools, store=self.store,
                pepper=self.pepper, record=self.record, metrics=self.metrics, tree=self.services)
            from twisted.internet.task import LoopingCall

            sweeping = LoopingCall(self._sweep)
            sweeping.clock = self._reactor
            if self._role is None or self._role.index == 0:  # one sweep for the store
                self.services.part("sweep",
                                   start=lambda: sweeping.start(SWEEP_INTERVAL, now=True),
                                   stop=lambda: sweeping.running and sweeping.stop())
            if hasattr(state.store, "listen"):
                self._listen_for_changes(state.store)
            self.listeners = listeners = Listeners(
                reactor=self._reactor, tree=self.services, files_pool=self.pools.files,
                core=self.core, budget=self.budget, metrics=self.metrics,
                sockets=self._role.sockets if self._role is not None else None,
                reuse_ports=self._role is not None)
            # Stopped after the listeners stop taking connections.
            self.services.part("sessions", stop=lambda: Deferred.fromCoroutine(
                listeners.drain(self.config.shutdown.grace)))
            for listener in self.config.listeners:
                await listeners.listen(listener)
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

    def _listen_for_changes(self, store: Any) -> None:
        """A store that announces changes (PostgreSQL's NOTIFY): read the
        feed when told, so a deletion on any node takes effect here at once;
        poll every second only while the announcements are cut off, and
        catch up whenever they resume, so nothing is missed."""
        import threading

        stop = threading.Event()
        authenticator = self.core.authenticator

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
            return self.pools.files.submit(thread.join, 5.0)

        self.services.part("change feed", start=thread.start, stop=halt)

    def admin(self, actor: str) -> Admin:
        """The rules of app passwords and users (:class:`proxy.admin.Admin`)
        for the portal and the sweep: call its methods on the store pool."""
        return Admin(
            store=self._state_store,
            hasher=apppasswords.Hasher(hash_parameters(self.config)),
            pepper=self.pepper,
            audit=FromThread(self._reactor, self.record),
            policy=self.config.policy,
            clock=self._reactor.seconds,
            actor=actor,
        )

    async def _sweep(self) -> None:
        """App passwords that expired or went unused are marked stopped (and
        their sessions end); those stopped 30 days ago are forgotten."""
        try:
            stopped = await self.pools.store.submit(self.admin("sweep").sweep)
        except Exception:
            log.failure("cannot sweep the store")
            return
        if stopped and self.core is not None:
            await self.core.authenticator.poll_changes()

    async def _serve_portal(self) -> None:
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.task import LoopingCall
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from proxy.portal.app import Portal
        from proxy.secondfactor import KeyBox

        config = self.config.portal
        assert config.certificate is not None and config.private_key is not None
        try:
            keybox = await self.pools.store.submit(
                KeyBox.load, self.config.store.totp_key_path, create=True)
        except apppasswords.PepperError as e:
            raise StartupError(f"store.totp_key_file: {e}") from None
        try:
            tls = await self.pools.files.submit(ServerTLS, config.certificate, config.private_key)
        except TLSFilesError as e:
            raise StartupError(f"portal: {e}") from None
        hasher = apppasswords.Hasher(hash_parameters(self.config))
        # Built on the files pool: it reads its templates and static files
        # (and portal.oidc's secret and CA, which may be missing).
        try:
            self.portal = await self.pools.files.submit(functools.partial(
                Portal, reactor=self._reactor, config=lambda: self.config,
                authenticator=self.core.authenticator,
                admin=self.admin, store_pool=self.pools.store, files_pool=self.pools.files,
                keybox=keybox, record=self.record,
                hash_secret=lambda secret: self.pools.hashing.submit(hasher.hash, secret),
            ))
        except configuration.ConfigError as e:
            raise StartupError(str(e)) from None
        sessions = self.portal.sessions

        def revoked(username: str, app_password_id: str | None, kind: str) -> None:
            # What ends a user's sessions everywhere ends their page sessions too.
            if kind in ("account_inactive", "password_change", "second_factor_reset"):
                sessions.end_user(username)

        self.core.authenticator.on_revoked(revoked)
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
        self.services.part("portal", start=lambda: expiring.start(60, now=False),
                   stop=lambda: (expiring.running and expiring.stop(), port.stopListening())[1])
        log.info("portal on {endpoint}", endpoint=config.endpoint)

    async def _serve_metrics(self, endpoint: str) -> None:
        from twisted.internet.endpoints import serverFromString

        try:
            port = await serverFromString(self._reactor, endpoint).listen(
                site(self.metrics, self.not_ready))
        except Exception as e:
            raise StartupError(f"metrics.endpoint: cannot listen: {e}") from None
        self.services.part("metrics", stop=port.stopListening)
        log.info("metrics and health on {endpoint}", endpoint=endpoint)

    @property
    def authenticator(self) -> Any:
        return self.core.authenticator if self.core is not None else None

    @property
    def directory(self) -> Any:
        return self.core.directory if self.core is not None else None

    def not_ready(self) -> list[str]:
        """Why a load balancer should not send clients here now (empty: ready)."""
        return health.not_ready(
            config=self.config, listening=len(self.listeners or ()),
            now=self._reactor.seconds(), authenticator=self.authenticator,
            directory=self.directory)

    async def reload(self) -> None:
        """SIGHUP: read the config again; keep the running one if the new one is bad."""
        sd_notify("RELOADING=1")
        try:
            new = await self.pools.store.submit(configuration.load, self._config_path)
        except configuration.ConfigError as e:
            log.error("reload refused, keeping the running config: {error}", error=str(e))
            # The audit file is reopened all the same: a SIGHUP after a log
            # rotation must not leave events going to the rotated file.
            await self.audit.reopen(self.config.audit)
            return
        if self._role is not None:
            new = self._role.applied(new)
        fixed = ("store", "hashing", "directory", "throttle", "cache", "limits", "metrics",
                 "shutdown", "portal", "webhooks")
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
        # Before any await: every batch written from here on goes to the new file.
        reopened = self.audit.reopen(new.audit)
        if self.listeners is not None:
            await self.listeners.reload(old_listeners, new.listeners)
        if self.core is not None:
            self.core.authenticator.policy = new.policy
            if blocked_now:
                self.core.sessions.end_all("legacy_blocked")
        await reopened
        if self.listeners is not None:
            await self.listeners.reload_certificates()
        if self.portal_tls is not None:
            try:
                await self.pools.files.submit(self.portal_tls.reload)
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


async def serve(reactor: Any, config_path: Path, config: configuration.Config,
                role: WorkerRole | None = None) -> None:
    """Run until the reactor stops (SIGTERM, SIGINT); as one of a
    supervisor's workers with ``role``."""
    daemon = Daemon(reactor, config_path, config, role)
    reactor.addSystemEventTrigger("before", "shutdown", daemon.services.stopService)
    await daemon.start()
    daemon.install_signal_handlers()
    sd_notify("READY=1")
    watchdog(reactor)
    stopped: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: stopped.callback(None))
    await stopped
