"""The Prometheus families, and the health answers for load balancers.

Events (sign-ins and their latency, cache lookups, backend logins, directory
round trips) are counted as they happen, on the reactor thread, with
``prometheus_client``'s counters and histograms in a registry of the
daemon's own. State (connections, sessions, pools, lockouts, health, bytes
relayed) is read when Prometheus scrapes, from the objects that hold it, so
that the relay's hot path only adds to an integer.

Served by twisted.web on a listener of its own (``metrics.endpoint``, off by
default): ``/metrics``, ``/health/live`` and ``/health/ready``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.web.resource import Resource

PREFIX = "legacy_auth_proxy"
# Sign-ins are answered from a cache in microseconds, or after an argon2 run
# or a directory bind in tens of milliseconds; refusals wait for the source's
# failure delay (seconds).
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
ROUND_TRIP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """Every family the daemon exports. Parts of the daemon take one of
    these (or None, in tests) and call its methods; none imports Prometheus."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self._sign_ins = Counter(f"{PREFIX}_sign_ins", "Sign-ins decided, by outcome and reason",
                                 ["protocol", "realm", "outcome", "reason"], registry=r)
        self._decision = Histogram(f"{PREFIX}_decision_seconds",
                                   "Time from a sign-in's start to its answer (failure delays included)",
                                   ["protocol", "outcome"], buckets=DECISION_BUCKETS, registry=r)
        self._cache = Counter(f"{PREFIX}_cache_lookups", "Success-cache lookups",
                              ["cache", "result"], registry=r)
        self._backend_logins = Counter(f"{PREFIX}_backend_logins",
                                       "Logins to a backend as the user, by result",
                                       ["listener", "result"], registry=r)
        self._backend_seconds = Histogram(f"{PREFIX}_backend_login_seconds",
                                          "Time to log in to a backend as the user",
                                          ["listener"], buckets=ROUND_TRIP_BUCKETS, registry=r)
        self._token_failures = Counter(f"{PREFIX}_token_failures",
                                       "Access tokens the identity provider did not give "
                                       "(backend_login: oauth2), by why",
                                       ["reason"], registry=r)
        self._directory_seconds = Histogram(f"{PREFIX}_directory_seconds",
                                            "Round trips to the upstream directory",
                                            ["pool"], buckets=ROUND_TRIP_BUCKETS, registry=r)
        self._state = _State()
        r.register(self._state)
        self.backend_up: dict[str, bool] = {}  # by listener: the last login's result

    # -- events ----------------------------------------------------------------------

    def _child(self, family: Any, *labels: str) -> Any:
        """``family.labels(*labels)``, kept: finding a child by its labels
        costs more than counting, and a sign-in counts three."""
        key = (id(family), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def sign_in(self, protocol: str, realm: str, outcome: str, reason: str, seconds: float) -> None:
        self._child(self._sign_ins, protocol, realm, outcome, reason).inc()
        self._child(self._decision, protocol, outcome).observe(seconds)

    def cache(self, cache: str, hit: bool) -> None:
        self._child(self._cache, cache, "hit" if hit else "miss").inc()

    def backend_login(self, listener: str, ok: bool, seconds: float) -> None:
        self._backend_logins.labels(listener, "ok" if ok else "failed").inc()
        self.backend_up[listener] = ok
        if ok:
            self._backend_seconds.labels(listener).observe(seconds)

    def token_failure(self, reason: str) -> None:
        """The token endpoint was unreachable or refused (``reason``: a few
        words, never a secret; the kind of refusal, not its text)."""
        self._token_failures.labels(reason).inc()

    def directory_round_trip(self, pool: str, seconds: float) -> None:
        self._directory_seconds.labels(pool).observe(seconds)

    # -- state, read at scrape time -----------------------------------------------------------

    def watch(self, source: Callable[[], Iterable[Any]]) -> None:
        """``source()`` yields metric families when Prometheus scrapes."""
        self._state.sources.append(source)


class _State:
    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Any]]] = []

    def collect(self) -> Iterable[Any]:
        for source in self.sources:
            yield from source()

    def describe(self) -> Iterable[Any]:
        return []


def _family(kind: Any, name: str, documentation: str, labels: list[str],
            values: Iterable[tuple[list[str], float]]) -> Any:
    family = kind(f"{PREFIX}_{name}", documentation, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


def gauge(name: str, documentation: str, labels: list[str],
          values: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    return _family(GaugeMetricFamily, name, documentation, labels, values)


def counter(name: str, documentation: str, labels: list[str],
            values: Iterable[tuple[list[str], float]]) -> CounterMetricFamily:
    return _family(CounterMetricFamily, name, documentation, labels, values)


# -- the web side -------------------------------------------------------------------------


class NoServerHeader:
    """Mixed into a twisted.web ``Request``: answers without the ``Server:
    TwistedWeb/VERSION`` header Twisted puts on every one (as nginx's
    ``server_tokens off``): which version of what runs here is no one's
    business. Used by this listener and the portal."""

    def write(self, data: bytes) -> None:
        if not self.startedWriting:  # type: ignore[attr-defined]
            self.responseHeaders.removeHeader(b"Server")  # type: ignore[attr-defined]
        super().write(data)  # type: ignore[misc]


class _Metrics(Resource):
    """/metrics, rendered on the reactor thread: the state it reads (the
    daemon's connections, pools, throttle) is only ever touched there.
    prometheus_client's own Twisted resource runs in a thread pool."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._registry)


class _Health(Resource):
    isLeaf = True

    def __init__(self, check: Callable[[], list[str]]) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request: Any) -> bytes:
        return ready_answer(request, self._check())


def ready_answer(request: Any, problems: list[str]) -> bytes:
    """/health/ready's answer: ``ok``, or 503 and the problems in a line."""
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    if problems:
        request.setResponseCode(503)
        return ("not ready: " + "; ".join(problems) + "\n").encode()
    return b"ok\n"


def site(metrics: Metrics, ready: Callable[[], list[str]]) -> Any:
    """The metrics listener's site: /metrics, /health/live, /health/ready
    (``ready()`` lists what is wrong; empty when ready)."""
    from twisted.web.server import Request, Site

    class _Request(NoServerHeader, Request):
        pass

    root = Resource()
    root.putChild(b"metrics", _Metrics(metrics.registry))
    health = Resource()
    health.putChild(b"live", _Health(lambda: []))
    health.putChild(b"ready", _Health(ready))
    root.putChild(b"health", health)
    factory = Site(root, requestFactory=_Request)
    factory.noisy = False
    factory.displayTracebacks = False
    # No access log: scrapes every few seconds are noise, not an event.
    factory.log = lambda request: None  # type: ignore[method-assign]
    return factory
