"""``workers: N``: one supervisor and N worker processes, as nginx's master
and ``worker_processes``.

The supervisor is the process systemd starts. It opens every listener's
socket once and hands the same sockets to each worker (inherited file
descriptors, not ``SO_REUSEPORT``): the kernel keeps one accept queue per
port, so a worker that dies takes only the connections it had accepted,
never those waiting in a queue of its own; the supervisor binds the
privileged ports once and socket activation's sockets pass on as they are.
Each worker is the single-process daemon (:mod:`proxy.service`) told by
:class:`WorkerRole` which sockets to adopt, where to serve its metrics
(a Unix socket in the supervisor's private folder) and whether it serves
the portal (worker 0: page sessions live in one process's memory). TLS
ends in the workers, each reading the certificates as one process would.

The workers speak sd_notify to the supervisor, not to systemd: each
worker's ``NOTIFY_SOCKET`` is a datagram socket of the supervisor, so
``READY=1``, ``RELOADING=1`` and ``WATCHDOG=1`` arrive here unchanged, and
the supervisor alone tells systemd (``NotifyAccess=main``): ready when
every worker is, reloading until every worker has reloaded. SIGHUP and
SIGTERM are handled once here and forwarded. A worker that dies is started
again after a delay that doubles while it keeps dying (:class:`Restarts`);
one that dies too often in a row makes the supervisor stop the others and
exit 1, so systemd's own restart policy takes over.

The workers share lockouts, revocations and the change feed through the
store, exactly as a fleet's nodes do (SQLite in WAL mode on one host, or
PostgreSQL); their audit lines go to one file, each batch one ``write``
with ``O_APPEND`` (:mod:`proxy.audit`), so lines never interleave. Metrics
are gathered from every worker at scrape time and summed
(:func:`summed`): the daemon's gauges are read from live objects when
Prometheus scrapes, which prometheus_client's multiprocess mode (files of
counters, no custom collectors) cannot do.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol
from twisted.logger import Logger

from proxy import config as configuration
from proxy.daemon.tree import sd_notify

log = Logger(namespace="legacy_auth_proxy.supervisor")

ROLE_VARIABLE = "LEGACY_AUTH_PROXY_WORKER"
EX_TEMPFAIL = 75
EX_CONFIG = 78
# Given for a worker to reload (certificates, the config) before the
# supervisor tells systemd it is ready all the same.
RELOAD_DEADLINE = 60.0
# After shutdown.grace, what a worker is given to say goodbye and write
# what it holds before it is killed.
STOP_MARGIN = 15.0


def worker_count(config: configuration.Config) -> int:
    """``workers`` as a number: ``auto`` is the cores this process may run on."""
    if config.workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)
    return int(config.workers)


# -- what a worker is told ---------------------------------------------------------------


@attrs.frozen
class WorkerRole:
    """What the supervisor tells one worker, in its environment."""

    index: int
    supervisor: int  # its process id: a worker whose supervisor is gone stops
    metrics: str  # the worker's own metrics endpoint (a Unix socket)
    portal: bool  # worker 0 serves the portal
    sockets: dict[str, tuple[int, int]] = attrs.field(factory=dict)  # endpoint: (fd, family)

    def to_environment(self) -> str:
        return json.dumps({"index": self.index, "supervisor": self.supervisor,
                           "metrics": self.metrics, "portal": self.portal,
                           "sockets": {k: list(v) for k, v in self.sockets.items()}})

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> WorkerRole | None:
        text = (os.environ if environ is None else environ).get(ROLE_VARIABLE)
        if not text:
            return None
        value = json.loads(text)
        return cls(index=value["index"], supervisor=value["supervisor"],
                   metrics=value["metrics"], portal=value["portal"],
                   sockets={k: (v[0], v[1]) for k, v in value["sockets"].items()})

    def applied(self, config: configuration.Config) -> configuration.Config:
        """The config as this worker runs it: its metrics on its own socket,
        the portal on worker 0 only. ``workers`` stays: it shares failures
        through the store as several processes must."""
        return attrs.evolve(
            config,
            metrics=attrs.evolve(config.metrics, endpoint=self.metrics),
            portal=config.portal if self.portal
            else attrs.evolve(config.portal, endpoint=None))

    def watch_supervisor(self) -> None:
        """Linux's parent-death signal: SIGTERM when the supervisor is gone
        (killed with SIGKILL), so that no worker is left holding the ports."""
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
        if os.getppid() != self.supervisor:
            os.kill(os.getpid(), signal.SIGTERM)  # gone before prctl


# -- when a dead worker is started again -------------------------------------------------


@attrs.frozen
class Backoff:
    """A dead worker waits ``first`` seconds, doubled for each time it died
    within ``window``, at most ``most``; a worker that died ``limit`` times
    within ``window`` is dying in a loop."""

    first: float = 0.5
    most: float = 30.0
    window: float = 120.0
    limit: int = 6


class Restarts:
    """The deaths of each worker and what follows each: a delay, or giving
    up. No I/O; the clock is passed in."""

    def __init__(self, clock: Any, backoff: Backoff = Backoff()) -> None:
        self._clock = clock
        self._backoff = backoff
        self._deaths: dict[int, list[float]] = {}

    def died(self, index: int) -> float | None:
        """A worker died now: the seconds to wait before starting it again,
        or None when it dies in a loop (give up)."""
        now = self._clock.seconds()
        recent = [t for t in self._deaths.get(index, []) if now - t < self._backoff.window]
        recent.append(now)
        self._deaths[index] = recent
        if len(recent) >= self._backoff.limit:
            return None
        return min(self._backoff.most, self._backoff.first * 2 ** (len(recent) - 1))


# -- the supervisor ----------------------------------------------------------------------


class Failed(Exception):
    """The workers could not be started (or kept running): exit with ``code``."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


@attrs.define(eq=False)
class Worker:
    index: int
    process: Any = None  # its IProcessTransport while it runs
    ready: bool = False
    last_ping: float = 0.0
    waiting: list[Deferred[None]] = attrs.field(factory=list)  # for its next READY=1
    pending: Any = None  # the delayed call that starts it again
    killed: bool = False  # by the watchdog, on its way out
    starting: bool = False  # not yet ready since it was started

    def fire(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


class _Exits(ProcessProtocol):
    def __init__(self, ended: Callable[[int | None, int | None], None]) -> None:
        self._ended = ended
        self.ended = False

    def processEnded(self, reason: Any) -> None:
        self.ended = True
        self._ended(getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None))


class Supervisor:
    """N workers: started, told of reloads and stops, watched, and started
    again when they die. ``spawn(index, protocol)`` starts worker ``index``
    and returns its process transport; ``notify`` is what systemd hears."""

    def __init__(self, *, clock: Any, count: int, spawn: Callable[[int, Any], Any],
                 restarts: Restarts, notify: Callable[[str], None] = sd_notify,
                 watchdog: float | None = None, stop_timeout: float = 30.0) -> None:
        self._clock = clock
        self._spawn = spawn
        self._restarts = restarts
        self._notify = notify
        self._watchdog = watchdog
        self._stop_timeout = stop_timeout
        self.workers = [Worker(i) for i in range(count)]
        self.restarted = 0  # workers started again after dying
        self.started = False  # every worker was ready once: the service is up
        self.stopping = False
        self.done: Deferred[int] = Deferred()  # fires with the exit code
        self._gone: Deferred[None] = Deferred()  # every worker gone, once stopping
        self._checking: Any = None

    # -- starting ---------------------------------------------------------------------

    async def start(self) -> None:
        """Every worker started and ready; :class:`Failed` if one exits first."""
        for worker in self.workers:
            if self.stopping:  # one ended as it was spawned: the rest are not
                break
            self._start(worker)
        await self._all_ready()
        if self.stopping:  # one could not start: the others are stopping
            raise Failed(await self.finished(), "a worker could not start")
        self.started = True
        self._notify(f"READY=1\nSTATUS={len(self.workers)} workers")
        if self._watchdog:
            from twisted.internet.task import LoopingCall

            self._checking = LoopingCall(self._check_pings)
            self._checking.clock = self._clock
            self._checking.start(self._watchdog / 2, now=False)
        log.info("legacy-auth-proxy supervisor: {count} workers ready", count=len(self.workers))

    def _start(self, worker: Worker) -> None:
        worker.pending = None
        worker.ready = False
        worker.starting = True
        exits = _Exits(lambda code, sig: self._exited(worker, code, sig))
        try:
            process = self._spawn(worker.index, exits)
        except Exception:  # out of processes or descriptors: as if it died at once
            log.failure("worker {index}: cannot start a process", index=worker.index)
            if not exits.ended:  # (or its end was heard before the failure)
                self._exited(worker, None, None)
            return
        # Twisted reaps a child already gone within spawnProcess, before it
        # returns: its end has been handled, and it must not count as running.
        if not exits.ended:
            worker.process = process

    async def _all_ready(self) -> None:
        waits = []
        for worker in self.workers:
            if not worker.ready and worker.process is not None:
                d: Deferred[None] = Deferred()
                worker.waiting.append(d)
                waits.append(d)
        await DeferredList(waits)

    def finished(self) -> Deferred[int]:
        """Fires with the exit code (``done`` keeps its result for others)."""
        d: Deferred[int] = Deferred()

        def passed(code: int) -> int:
            d.callback(code)
            return code

        self.done.addCallback(passed)
        return d

    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.process is not None]

    # -- what the workers say -------------------------------------------------------

    def notified(self, index: int, message: bytes) -> None:
        """A worker's sd_notify datagram."""
        worker = self.workers[index]
        for line in message.decode("utf-8", "replace").splitlines():
            if line == "READY=1":
                if worker.starting and self.started:
                    log.info("worker {index} started again, ready", index=worker.index)
                worker.starting = False
                worker.ready = True
                worker.last_ping = self._clock.seconds()
                worker.fire()
            elif line == "RELOADING=1":
                worker.ready = False
            elif line == "WATCHDOG=1":
                worker.last_ping = self._clock.seconds()

    def _check_pings(self) -> None:
        """A worker whose reactor stopped turning (no WATCHDOG=1 within the
        interval) is killed, and then started again as one that died."""
        now = self._clock.seconds()
        for worker in self.alive():
            if worker.ready and not worker.killed and now - worker.last_ping > self._watchdog:
                worker.killed = True
                log.error("worker {index}: no watchdog ping for {seconds:.0f} s: killing it",
                          index=worker.index, seconds=now - worker.last_ping)
                _signal(worker, "KILL")

    def _exited(self, worker: Worker, code: int | None, sig: int | None) -> None:
        worker.process = None
        worker.ready = False
        worker.killed = False
        try:
            self._after_exit(worker, code, sig)
        finally:
            worker.fire()  # after the decision: a start waiting on it sees it

    def _after_exit(self, worker: Worker, code: int | None, sig: int | None) -> None:
        if self.stopping:
            if not self.alive() and not self._gone.called:
                self._gone.callback(None)
            return
        how = (f"exit code {code}" if code is not None else f"signal {sig}" if sig is not None
               else "no process")
        if not self.started:
            # It could not start: the others are stopped and the supervisor
            # exits as the worker did (75: the store is away, try later;
            # 78: the config or state is wrong).
            log.error("worker {index} could not start ({how}): stopping", index=worker.index,
                      how=how)
            self._give_up(code if code in (EX_TEMPFAIL, EX_CONFIG) else 1)
            return
        delay = self._restarts.died(worker.index)
        if delay is None:
            log.critical("worker {index} keeps dying ({how}): giving up, stopping every worker",
                         index=worker.index, how=how)
            self._give_up(1)
            return
        log.error("worker {index} died ({how}): starting it again in {delay} s",
                  index=worker.index, how=how, delay=delay)
        worker.pending = self._clock.callLater(delay, self._restart, worker)

    def _restart(self, worker: Worker) -> None:
        if self.stopping:
            return
        self.restarted += 1
        self._start(worker)

    def _give_up(self, code: int) -> None:
        Deferred.fromCoroutine(self.stop("giving up", code))

    # -- reload and stop ------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP, once: forwarded to every worker; systemd hears READY=1
        when each has reloaded (or within :data:`RELOAD_DEADLINE`)."""
        self._notify("RELOADING=1")
        waits = []
        # A worker still starting reads the config as it is now: told
        # nothing (before its handler is in place SIGHUP would end it).
        for worker in [w for w in self.alive() if not w.starting]:
            d: Deferred[None] = Deferred()
            worker.waiting.append(d)
            waits.append(d)
            _signal(worker, "HUP")
        everyone = DeferredList(waits)
        everyone.addTimeout(RELOAD_DEADLINE, self._clock)
        try:
            await everyone
        except Exception:
            log.warn("not every worker said it had reloaded within {seconds} s",
                     seconds=RELOAD_DEADLINE)
        if self.stopping:
            return  # systemd heard STOPPING=1 meanwhile
        self._notify("READY=1")
        log.info("every worker reloaded")

    async def stop(self, why: str, code: int = 0) -> None:
        """SIGTERM (or giving up), once: forwarded to every worker, which
        drains its sessions as one process would; one still there after
        ``stop_timeout`` is killed. ``done`` then fires with ``code``."""
        if self.stopping:
            return
        self.stopping = True
        self._notify("STOPPING=1")
        log.info("stopping every worker ({why})", why=why)
        if self._checking is not None and self._checking.running:
            self._checking.stop()
        for worker in self.workers:
            if worker.pending is not None and worker.pending.active():
                worker.pending.cancel()
            worker.pending = None
        for worker in self.alive():
            _signal(worker, "TERM")
        if not self.alive():
            self._gone.callback(None)
        late = self._clock.callLater(self._stop_timeout, self._kill_the_rest)
        await self._gone
        if late.active():
            late.cancel()
        self.done.callback(code)

    def _kill_the_rest(self) -> None:
        for worker in self.alive():
            log.error("worker {index} did not stop in time: killing it", index=worker.index)
            _signal(worker, "KILL")


def _signal(worker: Worker, name: str) -> None:
    try:
        worker.process.signalProcess(name)
    except Exception:  # ProcessExitedAlready: its end is on its way
        pass


# -- metrics of every worker, summed -----------------------------------------------------

# 1 only if 1 in every worker.
_LEAST = {"ready", "directory_up", "backend_up", "change_feed_listening"}
# The same in every worker (the lockouts come from the one store).
_MOST = {"lockouts"}


def summed(texts: Iterable[str]) -> list[Any]:
    """Prometheus families from each worker's exposition text, added up by
    name and labels: counts and histograms summed; states that are 1 when
    well (ready, directory_up, ...) the least of them; lockouts, shared
    through the store, the most; creation times the earliest."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    from proxy.metrics import PREFIX

    families: dict[str, Any] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            short = family.name.removeprefix(PREFIX + "_")
            merge: Callable[[float, float], float] = (
                min if short in _LEAST else max if short in _MOST else float.__add__)
            seen = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                value = float(sample.value)
                if key not in seen:
                    seen[key] = value
                elif sample.name.endswith("_created"):
                    seen[key] = min(seen[key], value)
                else:
                    seen[key] = merge(seen[key], value)
    result = []
    for name, metric in families.items():
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)
        result.append(metric)
    return result


class _Notifications(DatagramProtocol):
    noisy = False

    def __init__(self, index: int, supervisor: Supervisor) -> None:
        self._index = index
        self._supervisor = supervisor

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self._supervisor.notified(self._index, data)


# -- putting it together: what `serve` runs when workers is not 1 ----------------------------


def open_sockets(reactor: Any, config: configuration.Config) -> dict[str, socket.socket]:
    """Every listener's socket, opened once, by endpoint string. Raises
    StartupError naming the listener that cannot listen."""
    from proxy.bootstrap import StartupError
    from proxy.transports import listening_socket

    sockets: dict[str, socket.socket] = {}
    try:
        for listener in config.listeners:
            if listener.endpoint in sockets:
                continue
            try:
                sockets[listener.endpoint] = _open(reactor, listener.endpoint, listening_socket)
            except (OSError, ValueError, LookupError) as e:
                text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise StartupError(f"listener {listener.label}: cannot listen: {text}") from None
    except BaseException:
        for s in sockets.values():
            s.close()
        raise
    return sockets


def _open(reactor: Any, endpoint: str,
          listening_socket: Callable[..., socket.socket]) -> socket.socket:
    kind = endpoint.split(":", 1)[0]
    if kind in ("tcp", "tcp6"):
        return listening_socket(endpoint, reuse_port=False)
    # systemd:domain=INET:index=N (or name=NAME): a socket systemd passed
    # in, found as Twisted's endpoint finds it (Twisted reads LISTEN_FDS once,
    # as it is imported, and takes it out of the environment).
    from twisted.internet.endpoints import serverFromString

    fd = serverFromString(reactor, endpoint).fileno
    sock = socket.socket(fileno=os.dup(fd))
    # systemd hands it over blocking; a worker's accept loop, reading until
    # EAGAIN, would then hang in accept(). The flag belongs to the open
    # socket, so every worker's copy is non-blocking with this one.
    sock.setblocking(False)
    return sock


async def supervise(reactor: Any, config_path: Any, config: configuration.Config) -> int:
    """Run ``worker_count(config)`` workers until SIGTERM; the exit code."""
    import shutil
    import tempfile

    from twisted.internet.threads import deferToThread

    from proxy.bootstrap import StartupError
    from proxy.daemon.tree import watchdog

    # Signal handlers once the reactor runs: it installs its own as it starts.
    running: Deferred[None] = Deferred()
    reactor.callWhenRunning(running.callback, None)
    await running
    count = worker_count(config)
    sockets = open_sockets(reactor, config)
    folder = tempfile.mkdtemp(prefix="legacy-auth-proxy-workers-")
    pid = os.getpid()
    usec = os.environ.get("WATCHDOG_USEC")
    watching = usec is not None and usec.isdigit() and os.environ.get("WATCHDOG_PID") in (None, str(pid))
    base = {k: v for k, v in os.environ.items()
            if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID",
                         "NOTIFY_SOCKET", "WATCHDOG_USEC")}

    def spawn(index: int, protocol: Any) -> Any:
        # The sockets held now: a reload may have closed some.
        held = {endpoint: (s.fileno(), int(s.family)) for endpoint, s in sockets.items()}
        role = WorkerRole(index=index, supervisor=pid,
                          metrics=f"unix:{folder}/metrics-{index}.sock:lockfile=0",
                          portal=index == 0, sockets=held)
        env = {**base, ROLE_VARIABLE: role.to_environment(),
               "NOTIFY_SOCKET": f"{folder}/notify-{index}.sock"}
        if watching:
            env["WATCHDOG_USEC"] = str(usec)
        try:
            os.unlink(f"{folder}/metrics-{index}.sock")  # a dead worker's
        except FileNotFoundError:
            pass
        fds: dict[int, Any] = {0: 0, 1: 1, 2: 2, **{fd: fd for fd, _ in held.values()}}
        return reactor.spawnProcess(
            protocol, sys.executable,
            [sys.executable, "-m", "proxy", "--config", str(config_path), "serve"],
            env=env, childFDs=fds)

    supervisor = Supervisor(
        clock=reactor, count=count, spawn=spawn, restarts=Restarts(reactor),
        watchdog=int(usec) / 1e6 if watching else None,
        stop_timeout=config.shutdown.grace + STOP_MARGIN)
    ports = [reactor.listenUNIXDatagram(f"{folder}/notify-{i}.sock", _Notifications(i, supervisor))
             for i in range(count)]
    metrics_port = None

    def cleanup() -> None:
        for port in ports:
            port.stopListening()
        if metrics_port is not None:
            metrics_port.stopListening()
        for s in sockets.values():
            s.close()
        shutil.rmtree(folder, ignore_errors=True)

    stopping: list[str] = []

    def on_stop(signum: int, frame: Any) -> None:
        if stopping:
            return  # once: a second Ctrl-C, or the group's signal
        stopping.append(signal.Signals(signum).name)
        reactor.callFromThread(lambda: Deferred.fromCoroutine(
            supervisor.stop(f"{stopping[0]} received")))

    async def reload() -> None:
        nonlocal config
        try:
            new = await deferToThread(configuration.load, config_path)
        except configuration.ConfigError as e:
            new = None
            log.error("reload: the new config is refused ({error}); the workers keep theirs",
                      error=str(e))
        if new is not None:
            if worker_count(new) != count:
                log.warn("workers: {count} takes effect at the next restart",
                         count=new.workers)
            # A listener the new config drops: the supervisor's copy closes
            # with the workers' (a new one each worker opens with SO_REUSEPORT).
            for endpoint in [e for e in sockets if e not in {l.endpoint for l in new.listeners}]:
                sockets.pop(endpoint).close()
            config = new
        await supervisor.reload()

    def on_hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(lambda: Deferred.fromCoroutine(reload()).addErrback(
            lambda f: log.failure("reload failed", f)))

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    log.info("legacy-auth-proxy supervisor: starting {count} workers", count=count)
    try:
        # What a first start creates (a new store, brought to the schema; a
        # new pepper), created here once: N workers starting together would
        # each try, and all but one meet a store locked while it is made.
        await deferToThread(_prepare_state, config)
        # Metrics and health first: /health/ready says which worker is not
        # ready yet while they start.
        if config.metrics.endpoint is not None:
            metrics_port = await _serve_metrics(reactor, config.metrics.endpoint, supervisor, folder)
        try:
            await supervisor.start()
        except Failed as e:
            return e.code
        watchdog(reactor)
        return await supervisor.finished()
    except StartupError:
        await supervisor.stop("cannot start")
        raise
    finally:
        cleanup()


def _prepare_state(config: configuration.Config) -> None:
    """Open the store and the pepper as a worker would, then close them; blocking."""
    from proxy.bootstrap import open_state

    open_state(config).store.close()


async def _serve_metrics(reactor: Any, endpoint: str, supervisor: Supervisor,
                         folder: str) -> Any:
    """The supervisor's /metrics (every worker's, summed, with its own
    families), /health/live and /health/ready (ready when every worker is)."""
    from twisted.internet.endpoints import UNIXClientEndpoint, serverFromString
    from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory, readBody
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Request, Site

    from proxy.bootstrap import StartupError
    from proxy.metrics import CONTENT_TYPE_LATEST, NoServerHeader, counter, gauge, ready_answer

    class _Endpoints:
        def endpointForURI(self, uri: Any) -> Any:
            return UNIXClientEndpoint(reactor, f"{folder}/metrics-{uri.host.decode()}.sock",
                                      timeout=5)

    class _Quiet(_HTTP11ClientFactory):
        noisy = False  # a line for each scrape of each worker otherwise

    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _Quiet
    agent = Agent.usingEndpointFactory(reactor, _Endpoints(), pool=pool)

    async def ask(index: int, path: str) -> tuple[int, bytes]:
        d = agent.request(b"GET", f"http://{index}{path}".encode())
        d.addTimeout(5, reactor)
        response = await d
        return response.code, await readBody(response)

    async def gather() -> bytes:
        from prometheus_client import generate_latest
        from prometheus_client.registry import Collector, CollectorRegistry

        texts = []
        for worker in supervisor.alive():
            try:
                code, body = await ask(worker.index, "/metrics")
            except Exception:
                continue  # starting again, or gone: its counts return with it
            if code == 200:
                texts.append(body.decode())
        families = summed(texts)
        families.append(gauge("workers", "Worker processes running", [],
                              [([], len(supervisor.alive()))]))
        families.append(counter("worker_restarts", "Workers started again after dying", [],
                                [([], supervisor.restarted)]))

        class _Once(Collector):
            def collect(self) -> Iterable[Any]:
                return families

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Once())
        return generate_latest(registry)

    async def readiness() -> list[str]:
        problems = []
        for worker in supervisor.workers:
            if worker.process is None or not worker.ready:
                problems.append(f"worker {worker.index} is "
                                + ("not running" if worker.process is None else "not ready"))
                continue
            try:
                code, body = await ask(worker.index, "/health/ready")
            except Exception:
                problems.append(f"worker {worker.index} does not answer")
                continue
            if code != 200:
                problems.append(f"worker {worker.index}: "
                                + body.decode("utf-8", "replace").strip().removeprefix("not ready: "))
        return problems

    class _Async(Resource):
        isLeaf = True

        def __init__(self, answer: Callable[[Any], Any]) -> None:
            super().__init__()
            self._answer = answer

        def render_GET(self, request: Any) -> Any:
            def done(result: Any) -> None:
                if not request.finished and not getattr(request, "_disconnected", False):
                    request.write(result)
                    request.finish()

            Deferred.fromCoroutine(self._answer(request)).addCallbacks(
                done, lambda f: (log.failure("metrics", f), done(b"")))
            return NOT_DONE_YET

    async def metrics(request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return await gather()

    async def ready(request: Any) -> bytes:
        return ready_answer(request, await readiness())

    async def live(request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"

    class _Request(NoServerHeader, Request):
        pass

    root = Resource()
    root.putChild(b"metrics", _Async(metrics))
    health = Resource()
    health.putChild(b"live", _Async(live))
    health.putChild(b"ready", _Async(ready))
    root.putChild(b"health", health)
    site = Site(root, requestFactory=_Request)
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None  # type: ignore[method-assign]
    try:
        port = await serverFromString(reactor, endpoint).listen(site)
    except Exception as e:
        raise StartupError(f"metrics.endpoint: cannot listen: {e}") from None
    log.info("metrics and health of every worker on {endpoint}", endpoint=endpoint)
    return port
