"""Whether the node is ready for clients (``/health/ready``), and the state
the metrics read when Prometheus scrapes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from proxy import config as configuration
from proxy.frontends.base import PreLoginBudget
from proxy.metrics import Metrics, counter, gauge
from proxy.threads import Pool

# The change feed reads the embedded store every second: ten reads missed
# in a row is a store that does not answer, not one slow disk write, and a
# node taken out of the balancer for it comes back within ten seconds of
# the store's return. Not a setting: no operator has needed another value.
STORE_SILENCE = 10.0


def not_ready(*, config: configuration.Config, listening: int, now: float,
              authenticator: Any, directory: Any) -> list[str]:
    """Why a load balancer should not send clients here now (empty: ready).
    ``listening``: how many listeners are open."""
    problems = []
    if listening < len(config.listeners):
        problems.append("not every listener is open")
    if authenticator is not None and config.store.url is None:
        # A shared store's outage is every node's alike: taking them all
        # out of the balancer would end what cached sign-ins still allow.
        ok_at = authenticator.store_ok_at
        if ok_at is None or now - ok_at > STORE_SILENCE:
            problems.append("the store does not answer")
    if directory is not None and config.directory is not None:
        since = directory.down_since()
        if since is not None and now - since > config.directory.outage_grace:
            problems.append("the directory does not answer, past the outage grace")
        # A pool that cannot serve fails sign-ins on this node alone,
        # whatever the directory does: no grace for that.
        problems.extend(directory.pool_problems())
    return problems


class StateMetrics:
    """What the metrics read when Prometheus scrapes, each from the part
    that holds it; the daemon hands in how to find the parts of the moment
    (front ends change with a reload)."""

    def __init__(self, *, metrics: Metrics, config: Callable[[], configuration.Config],
                 frontends: Callable[[], Iterable[Any]], pools: Sequence[Pool],
                 budget: PreLoginBudget, parts: Callable[[], Any],
                 feed_listening: Callable[[], bool], ready: Callable[[], list[str]]) -> None:
        self._metrics = metrics
        self._config = config
        self._frontends = frontends
        self._pools = pools
        self._budget = budget
        self._parts = parts
        self._feed_listening = feed_listening
        self._ready = ready

    def __call__(self) -> Iterable[Any]:
        # By label: a listener changed by a reload may have two front ends
        # for a while, the old one finishing its sessions.
        connections: dict[str, int] = {}
        sessions: dict[str, int] = {}
        relayed: dict[tuple[str, str], int] = {}
        paths: dict[tuple[str, str], int] = {}
        for frontend in list(self._frontends()):
            label = frontend.config.label
            counts = frontend.counts()
            connections[label] = connections.get(label, 0) + counts.connections
            sessions[label] = sessions.get(label, 0) + counts.sessions
            for direction, n in (("to_backend", counts.to_backend), ("to_client", counts.to_client)):
                relayed[label, direction] = relayed.get((label, direction), 0) + n
            for path, n in (("kernel", counts.in_kernel), ("python", counts.in_python)):
                paths[label, path] = paths.get((label, path), 0) + n
        yield gauge("connections", "Client connections open", ["listener"],
                    [([k], v) for k, v in connections.items()])
        yield gauge("sessions", "Signed-in sessions", ["listener"],
                    [([k], v) for k, v in sessions.items()])
        yield counter("relayed_bytes", "Bytes relayed after sign-in", ["listener", "direction"],
                      [(list(k), v) for k, v in relayed.items()])
        yield counter("relayed_sessions", "Sessions relayed after sign-in, by how: in the kernel "
                      "(splice, plain TCP on both sides) or in Python", ["listener", "path"],
                      [(list(k), v) for k, v in paths.items()])
        pools = self._pools
        yield gauge("pool_calls", "Calls under way or waiting in a thread pool", ["pool"],
                    [([p.name], p.pending) for p in pools])
        yield gauge("pool_capacity", "Calls a thread pool takes before it answers busy", ["pool"],
                    [([p.name], p.limit) for p in pools])
        yield counter("pool_refusals", "Calls a full thread pool refused", ["pool"],
                      [([p.name], p.refused) for p in pools])
        yield gauge("connections_before_login", "Connections not signed in, over all listeners",
                    [], [([], self._budget.connections)])
        yield gauge("bytes_before_login", "Bytes held for connections not signed in", [],
                    [([], self._budget.bytes)])
        parts = self._parts()
        if parts is not None:
            yield gauge("directory_up", "1 if the directory answered when last asked", [],
                        [([], 1 if parts.directory.up() else 0)])
            yield gauge("lockouts", "Users locked out now, as the help desk lists them", [],
                        [([], len(parts.authenticator.lockouts.locked_out()))])
            yield gauge("change_feed_position",
                        "The last change of the store's feed this node has applied", [],
                        [([], parts.authenticator.feed.position)])
        yield gauge("backend_up", "1 if the last login to the backend as a user worked",
                    ["listener"],
                    [([k], 1 if v else 0) for k, v in self._metrics.backend_up.items()])
        if self._config().store.url is not None:
            yield gauge("change_feed_listening",
                        "1 while the shared store announces changes (LISTEN/NOTIFY); 0: polling", [],
                        [([], 1 if self._feed_listening() else 0)])
        yield gauge("ready", "1 if the daemon is ready for clients (/health/ready)", [],
                    [([], 0 if self._ready() else 1)])
