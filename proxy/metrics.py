"""The Prometheus families, and the health answers for load balancers.

Events (sign-ins and their latency, cache lookups, backend logins, directory
round trips) are counted as they happen, on the reactor thread, in plain
numbers (:class:`Counts`, :class:`Timings`) that become Prometheus families
when it scrapes: a count is one dictionary update, with no lock and no walk
over a histogram's buckets in Python (``prometheus_client``'s ``inc`` and
``observe`` cost a sign-in several times that). State (connections,
sessions, pools, lockouts, health, bytes relayed) is read when Prometheus
scrapes too, from the objects that hold it, so that the relay's hot path
only adds to an integer. Everything is in a registry of the daemon's own.

Served by twisted.web on a listener of its own (``metrics.endpoint``, off by
default): ``/metrics``, ``/health/live`` and ``/health/ready``.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from twisted.web.resource import Resource

PREFIX = "legacy_auth_proxy"
# Sign-ins are answered from a cache in microseconds, or after an argon2 run
# or a directory bind in tens of milliseconds; refusals wait for the source's
# failure delay (seconds).
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
ROUND_TRIP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _Family:
    """A family counted on the reactor thread, one entry for each set of
    label values, read when Prometheus scrapes; ``NAME_created`` says when
    each set was first seen, as ``prometheus_client``'s own families do."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        self.name = f"{PREFIX}_{name}"
        self.documentation = documentation
        self.labels = labels
        self.created: dict[tuple[str, ...], float] = {}

    def describe(self) -> Iterable[Any]:
        return self.collect()

    def collect(self) -> Iterable[Any]:
        raise NotImplementedError


class Counts(_Family):
    """A counter family (``NAME_total``)."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        super().__init__(name, documentation, labels)
        self.counts: dict[tuple[str, ...], int] = {}

    def inc(self, labels: tuple[str, ...]) -> None:
        counts = self.counts
        if labels in counts:
            counts[labels] += 1
        else:
            counts[labels] = 1
            self.created[labels] = time.time()

    def collect(self) -> Iterable[Any]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, count in self.counts.items():
            family.add_metric(list(labels), count, created=self.created[labels])
        yield family


class Timings(_Family):
    """A histogram family: for each set of label values, how many
    observations fell in each bucket (made cumulative when Prometheus
    scrapes), and their sum."""

    def __init__(self, name: str, documentation: str, labels: list[str],
                 buckets: tuple[float, ...]) -> None:
        super().__init__(name, documentation, labels)
        self.bounds = buckets
        self._names = [floatToGoString(b) for b in buckets] + ["+Inf"]
        self.observed: dict[tuple[str, ...], list[float]] = {}  # a count a bucket, +Inf's, the sum

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        counts = self.observed.get(labels)
        if counts is None:
            counts = self.observed[labels] = [0] * (len(self.bounds) + 2)
            self.created[labels] = time.time()
        counts[bisect_left(self.bounds, seconds)] += 1  # the first bound at or over it
        counts[-1] += seconds

    def collect(self) -> Iterable[Any]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, counts in self.observed.items():
            total = 0.0
            buckets = []
            for name, count in zip(self._names, counts):
                total += count
                buckets.append((name, total))
            family.add_metric(list(labels), buckets, counts[-1])
            family.add_sample(f"{self.name}_created", dict(zip(self.labels, labels)),
                              self.created[labels])  # beside its set, as OpenMetrics wants
        yield family


class Metrics:
    """Every family the daemon exports. Parts of the daemon take one of
    these (or None, in tests) and call its methods; none imports Prometheus."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._sign_ins = Counts("sign_ins", "Sign-ins decided, by outcome and reason",
                                ["protocol", "realm", "outcome", "reason"])
        self._decision = Timings("decision_seconds",
                                 "Time from a sign-in's start to its answer (failure delays included)",
                                 ["protocol", "outcome"], DECISION_BUCKETS)
        self._cache = Counts("cache_lookups", "Success-cache lookups", ["cache", "result"])
        self._backend_logins = Counts("backend_logins", "Logins to a backend as the user, by result",
                                      ["listener", "result"])
        self._backend_seconds = Timings("backend_login_seconds",
                                        "Time to log in to a backend as the user",
                                        ["listener"], ROUND_TRIP_BUCKETS)
        self._token_failures = Counts("token_failures",
                                      "Access tokens the identity provider did not give "
                                      "(backend_login: oauth2), by why", ["reason"])
        self._directory_seconds = Timings("directory_seconds", "Round trips to the upstream directory",
                                          ["pool"], ROUND_TRIP_BUCKETS)
        for family in (self._sign_ins, self._decision, self._cache, self._backend_logins,
                       self._backend_seconds, self._token_failures, self._directory_seconds):
            self.registry.register(family)
        self._state = _State()
        self.registry.register(self._state)
        self.backend_up: dict[str, bool] = {}  # by listener: the last login's result

    # -- events ----------------------------------------------------------------------

    def sign_in(self, protocol: str, realm: str, outcome: str, reason: str, seconds: float) -> None:
        self._sign_ins.inc((protocol, realm, outcome, reason))
        self._decision.observe((protocol, outcome), seconds)

    def cache(self, cache: str, hit: bool) -> None:
        self._cache.inc((cache, "hit" if hit else "miss"))

    def backend_login(self, listener: str, ok: bool, seconds: float) -> None:
        self._backend_logins.inc((listener, "ok" if ok else "failed"))
        self.backend_up[listener] = ok
        if ok:
            self._backend_seconds.observe((listener,), seconds)

    def token_failure(self, reason: str) -> None:
        """The token endpoint was unreachable or refused (``reason``: a few
        words, never a secret; the kind of refusal, not its text)."""
        self._token_failures.inc((reason,))

    def directory_round_trip(self, pool: str, seconds: float) -> None:
        self._directory_seconds.observe((pool,), seconds)

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
