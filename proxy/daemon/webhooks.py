"""Audit events to webhooks, from the store's outbox (docs/events.md).

Three parts, each with one job:

- :class:`OutboxWriter` takes every audit event on the reactor thread and
  writes the rows of the webhooks that want it to the outbox in batches, on
  the outbox's own thread, in order: a sign-in never waits for it.
- :class:`Deliverer` (one per webhook) claims the first undelivered event of
  each lane (a user) for a lease, posts each signed, and marks it delivered
  only after a 2xx; a failure is tried again after a delay that doubles, with
  jitter. An event is claimed by one node at a time, so in a fleet one node
  delivers it; a daemon killed mid-delivery leaves it undelivered, and it is
  posted again (at least once).
- :class:`Housekeeping` reads the backlog for the metrics and prunes the
  outbox: delivered events after :data:`DELIVERED_KEPT`, undelivered ones
  after their webhook's ``give_up_after``.

Every clock is passed in: the unit tests run on ``task.Clock``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random as _random
import socket
import secrets as _secrets
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, TimeoutError as DeferredTimeout, succeed
from twisted.logger import Logger

from proxy import webclient
from proxy.metrics import counter, gauge
from proxy.store import OutboxEvent, OutboxStats, StoreError
from proxy.store import outbox
from proxy.threads import Busy

log = Logger(namespace="legacy_auth_proxy.webhooks")

SIGNATURE_HEADER = "Legacy-Auth-Proxy-Signature"
DELIVERED_KEPT = 86400.0  # delivered events stay this long (for a look), then go
STATS_INTERVAL = 5.0  # the backlog read for the metrics this often
PRUNE_INTERVAL = 3600.0
IDLE_POLL = 1.0  # an idle deliverer looks for due events this often (new ones wake it at once)
STORE_RETRY = 2.0  # after the store failed


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value: ``t=TIMESTAMP,v1=HEX``, where HEX is
    HMAC-SHA256 with the webhook's secret over ``TIMESTAMP.BODY`` (as
    Stripe signs its webhooks). A receiver computes the same and compares
    in constant time, and refuses a timestamp too far from its clock."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def retry_delay(attempts: int, initial: float, maximum: float,
                random: Callable[[], float] = _random.random) -> float:
    """How long to wait after the ``attempts``-th failure (1, 2, ...):
    ``initial`` doubled each time up to ``maximum``, then a random half of
    it taken off ("equal jitter"), so receivers coming back are not hit by
    every node's retries at once."""
    ceiling = min(maximum, initial * 2 ** min(max(attempts - 1, 0), 40))
    return ceiling / 2 + random() * ceiling / 2


def node_id() -> str:
    """Who claims events: unique to this process's run."""
    return f"{socket.gethostname()}:{os.getpid()}:{_secrets.token_hex(3)}"


class Failure(Exception):
    """A delivery that did not get a 2xx: ``reason`` is a metric's label,
    ``text`` what the outbox keeps (never a secret, never the URL)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text


class Counts:
    """Deliveries and failures by webhook, and what the writer dropped,
    for the metrics; the backlog as last read from the store."""

    def __init__(self) -> None:
        self.delivered: dict[str, int] = {}
        self.failed: dict[tuple[str, str], int] = {}
        self.dropped = 0
        self.backlog: dict[str, OutboxStats] = {}

    def _age(self, webhook: str, now: float) -> float:
        stats = self.backlog.get(webhook)
        if stats is None or stats.oldest is None:
            return 0.0
        return max(0.0, now - stats.oldest)

    def families(self, now: float, webhooks: Iterable[str]) -> Iterable[Any]:
        names = list(webhooks)
        yield counter("webhook_deliveries", "Events delivered to a webhook (a 2xx)",
                      ["webhook"], [([n], self.delivered.get(n, 0)) for n in names])
        yield counter("webhook_failures", "Deliveries that got no 2xx, by reason",
                      ["webhook", "reason"],
                      [([w, r], v) for (w, r), v in sorted(self.failed.items())])
        yield gauge("webhook_backlog", "Events in the outbox not yet delivered", ["webhook"],
                    [([n], self.backlog[n].waiting if n in self.backlog else 0) for n in names])
        yield gauge("webhook_oldest_undelivered_seconds",
                    "Age of the oldest event not yet delivered (0: none)", ["webhook"],
                    [([n], self._age(n, now)) for n in names])
        yield counter("webhook_events_dropped",
                      "Events not written to the outbox: its writer's queue was full",
                      [], [([], self.dropped)])


class OutboxWriter:
    """Audit events to the outbox: batched (one write per :attr:`DELAY` at
    most, :attr:`BATCH` events each), one write at a time so that rows land
    in the order the events happened, and bounded (:attr:`MAX_WAITING`
    events; past that an event is dropped and counted: a store that is
    down for long must not take the daemon's memory)."""

    DELAY = 0.05
    BATCH = 1000
    MAX_WAITING = 100_000

    def __init__(self, *, clock: Any, store: Any, webhooks: tuple[Any, ...], counts: Counts,
                 written: Callable[[set[str]], None] = lambda names: None) -> None:
        self._clock = clock
        self._store = store  # methods answer Deferreds (proxy.threads.Threaded)
        self.webhooks = webhooks
        self._counts = counts
        self._written = written
        self._waiting: list[outbox.Pending] = []
        self._timer: Any = None
        self._writing: Deferred[None] | None = None
        self._warned = False

    def add(self, record: dict[str, Any]) -> None:
        """One audit event (on the reactor thread): its JSON is made on the
        outbox's thread (the store given is an :class:`outbox.Encoding`)."""
        names = outbox.targets(record, self.webhooks)
        if not names:
            return
        if len(self._waiting) >= self.MAX_WAITING:
            self._counts.dropped += 1
            if not self._warned:
                self._warned = True
                log.error("the outbox cannot keep up (the store is down or slow): events for "
                          "webhooks are being dropped")
            return
        self._waiting.append((names, record))
        self._schedule(self.DELAY)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _schedule(self, delay: float) -> None:
        if self._timer is None and self._writing is None and self._waiting:
            self._timer = self._clock.callLater(delay, self._start)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start(self) -> None:
        self._timer = None
        writing = self._writing = Deferred.fromCoroutine(self._write())

        def after(ok: bool) -> None:
            self._writing = None
            self._schedule(self.DELAY if ok else STORE_RETRY)

        writing.addCallback(after)

    async def _write(self) -> bool:
        batch, self._waiting = self._waiting[:self.BATCH], self._waiting[self.BATCH:]
        try:
            await self._store.add_events(batch, self._clock.seconds())
        except Exception as e:
            # Kept, in front, to be written in order when the store answers.
            self._waiting[:0] = batch
            if isinstance(e, (StoreError, Busy)):
                log.warn("cannot write events to the outbox, trying again: {error}",
                         error=str(e))
            else:
                log.failure("cannot write events to the outbox")
            return False
        self._warned = False
        self._written({name for names, _ in batch for name in names})
        return True

    async def flush(self) -> None:
        """Write everything waiting (the daemon's stop), one batch after
        another; a store that fails now loses what is left (logged)."""
        self._cancel()
        if self._writing is not None:
            await self._writing
            self._cancel()
        while self._waiting:
            if not await self._write():
                log.error("{count} events for webhooks lost at stop: the store failed",
                          count=len(self._waiting))
                self._waiting.clear()
        self._cancel()


class Deliverer:
    """One webhook's deliveries, from the outbox: up to ``webhook.concurrency``
    lanes at once, one event of each lane in flight."""

    def __init__(self, *, clock: Any, store: Any, webhook: Any, secret: bytes,
                 post: Callable[[str, dict[str, str], bytes, float], Deferred[int]],
                 node: str, counts: Counts,
                 random: Callable[[], float] = _random.random) -> None:
        self._clock = clock
        self._store = store
        self.webhook = webhook
        self._secret = secret
        self._post = post
        self._node = node
        self._counts = counts
        self._random = random
        # Longer than a claim is held: the posts' timeout, and the writes
        # either side of them.
        self.lease = 2 * webhook.timeout + 10.0
        self._timer: Any = None
        self._turn: Deferred[None] | None = None
        self._running = False
        self._again = False

    def start(self) -> None:
        self._running = True
        self._wake(0.0)

    def stop(self) -> Deferred[None]:
        """No new turn; the one under way finishes (its posts are bounded
        by the webhook's timeout)."""
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._turn is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._turn.addBoth(lambda _: d.callback(None))
        return d

    def nudge(self) -> None:
        """New events for this webhook: look at once rather than at the next poll."""
        if self._turn is not None:
            self._again = True
        elif self._timer is not None and self._running:
            self._timer.cancel()
            self._timer = None
            self._wake(0.0)

    def _wake(self, delay: float) -> None:
        if self._running and self._timer is None and self._turn is None:
            self._timer = self._clock.callLater(delay, self._begin)

    def _begin(self) -> None:
        self._timer = None
        self._again = False
        self._turn = Deferred.fromCoroutine(self.turn())

        def done(result: Any) -> None:
            self._turn = None
            self._wake(0.0 if result or self._again else
                       (STORE_RETRY if result is None else IDLE_POLL))

        def failed(f: Any) -> None:
            log.failure("webhook {webhook}: delivery turn failed", f, webhook=self.webhook.name)
            return None  # as the store failing: the next turn after STORE_RETRY

        self._turn.addErrback(failed)
        self._turn.addCallback(done)

    async def turn(self) -> bool | None:
        """Claim what is due, post it, mark it: whether anything was found
        (None: the store failed)."""
        name = self.webhook.name
        try:
            events = await self._store.claim_events(
                (name,), self._node, self._clock.seconds(), self.lease, self.webhook.concurrency)
        except (StoreError, Busy) as e:
            log.warn("webhook {webhook}: cannot read the outbox: {error}", webhook=name,
                     error=str(e))
            return None
        if not events:
            return False
        results = await DeferredList([Deferred.fromCoroutine(self._send(e)) for e in events],
                                     consumeErrors=True)
        delivered: list[int] = []
        failed: list[tuple[int, float, str]] = []
        now = self._clock.seconds()
        for event, (_, outcome) in zip(events, results):
            if outcome is None:
                delivered.append(event.seq)
                self._counts.delivered[name] = self._counts.delivered.get(name, 0) + 1
                continue
            reason, text = (outcome.reason, outcome.text) if isinstance(outcome, Failure) \
                else ("error", "an error in the proxy (see its log)")
            key = (name, reason)
            self._counts.failed[key] = self._counts.failed.get(key, 0) + 1
            delay = retry_delay(event.attempts + 1, self.webhook.retry_initial,
                                self.webhook.retry_max, self._random)
            failed.append((event.seq, now + delay, text))
            log.warn("webhook {webhook}: event {seq} not delivered ({why}); trying again in "
                     "{delay:.1f}s", webhook=name, seq=event.seq, why=text, delay=delay)
        try:
            await self._store.settle_events(delivered, failed, now)
        except (StoreError, Busy) as e:
            # Delivered but not marked: posted again once the lease ends.
            log.warn("webhook {webhook}: cannot mark deliveries: {error}", webhook=name,
                     error=str(e))
            return None
        return True

    async def _send(self, event: OutboxEvent) -> Failure | None:
        body = event.body.encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "legacy-auth-proxy",
            SIGNATURE_HEADER: signature(self._secret, int(self._clock.seconds()), body),
            "Legacy-Auth-Proxy-Event": event.event,
            "Legacy-Auth-Proxy-Delivery": str(event.seq),
        }
        try:
            status = await self._post(self.webhook.url, headers, body, self.webhook.timeout)
        except Failure as e:
            return e
        except DeferredTimeout:
            return Failure("timeout", f"no answer within {self.webhook.timeout:g}s")
        except Exception as e:
            return Failure("connection", f"cannot reach the receiver ({type(e).__name__})")
        if 200 <= status < 300:
            return None
        kind = "status_4xx" if 400 <= status < 500 else \
            "status_5xx" if 500 <= status < 600 else "status_other"
        return Failure(kind, f"HTTP {status}")



class Housekeeping:
    """The backlog for the metrics, every :data:`STATS_INTERVAL`; the
    outbox pruned every :data:`PRUNE_INTERVAL`."""

    def __init__(self, *, clock: Any, store: Any, webhooks: tuple[Any, ...],
                 counts: Counts) -> None:
        self._clock = clock
        self._store = store
        self._webhooks = webhooks
        self._counts = counts
        self._last_prune = -PRUNE_INTERVAL

    async def tick(self) -> None:
        now = self._clock.seconds()
        try:
            if now - self._last_prune >= PRUNE_INTERVAL:
                self._last_prune = now
                longest = max((w.give_up_after for w in self._webhooks), default=7 * 86400.0)
                delivered, dropped = await self._store.prune_events(
                    now - DELIVERED_KEPT,
                    {w.name: now - w.give_up_after for w in self._webhooks}, now - longest)
                if dropped:
                    log.warn("{count} events dropped from the outbox undelivered: their "
                             "webhook's give_up_after had passed", count=dropped)
            self._counts.backlog = await self._store.outbox_stats()
        except (StoreError, Busy) as e:
            log.warn("cannot read the outbox: {error}", error=str(e))


# -- HTTP ---------------------------------------------------------------------------

MAX_ANSWER = 64 * 1024  # a receiver's answer is read (so its connection can be reused), up to this


def http_post(reactor: Any, ca: bytes | None) -> Callable[[str, dict[str, str], bytes, float],
                                                         Deferred[int]]:
    """A ``post(url, headers, body, timeout)`` answering the status, with
    persistent connections; HTTPS checked against ``ca`` (PEM) or the
    system's trust store. Redirects are not followed, and of the answer no
    more than MAX_ANSWER bytes are read."""
    connections = webclient.pool(reactor, per_host=16)
    agent = webclient.agent(reactor, ca, 30.0, connections)

    async def post(url: str, headers: dict[str, str], body: bytes, timeout: float) -> int:
        code, _ = await webclient.request(
            agent, reactor, b"POST", url, timeout=timeout, limit=MAX_ANSWER, cut_short=True,
            headers={k.encode(): [v.encode()] for k, v in headers.items()}, body=body)
        return code

    def call(url: str, headers: dict[str, str], body: bytes, timeout: float) -> Deferred[int]:
        d = Deferred.fromCoroutine(post(url, headers, body, timeout))
        d.addTimeout(timeout, reactor)
        return d

    call.close = connections.closeCachedConnections  # type: ignore[attr-defined]
    return call


# -- putting it together --------------------------------------------------------------


def read_secret(path: Any, key: str) -> bytes:
    """A webhook's signing secret from its file (the trailing newline is not
    part of it); blocking. Errors name the file and key, never the secret."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WebhookSetupError(f"{path}: {key}: cannot read: {e.strerror}") from None
    secret = data.rstrip(b"\r\n")
    if len(secret) < 16:
        raise WebhookSetupError(f"{path}: {key}: the secret must be at least 16 bytes")
    return secret


def read_ca(path: Any, key: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WebhookSetupError(f"{path}: {key}: cannot read: {e.strerror}") from None
    if b"BEGIN CERTIFICATE" not in data:
        raise WebhookSetupError(f"{path}: {key} holds no PEM certificate")
    return data


class WebhookSetupError(Exception):
    """A webhook's file cannot be used: the daemon does not start."""


class Webhooks:
    """The webhooks' parts over one outbox thread: the writer the audit log
    hands events to, one deliverer per webhook, the housekeeping."""

    def __init__(self, *, clock: Any, store: Any, webhooks: tuple[Any, ...],
                 secrets: dict[str, bytes], posts: dict[str, Any], node: str,
                 writing: Any) -> None:
        self.counts = Counts()
        self._clock = clock
        self.webhooks = webhooks
        self.deliverers = {
            w.name: Deliverer(clock=clock, store=store, webhook=w, secret=secrets[w.name],
                              post=posts[w.name], node=node, counts=self.counts)
            for w in webhooks}
        self.writer = OutboxWriter(clock=clock, store=writing, webhooks=webhooks,
                                   counts=self.counts, written=self._written)
        self.housekeeping = Housekeeping(clock=clock, store=store, webhooks=webhooks,
                                         counts=self.counts)

    def _written(self, names: set[str]) -> None:
        for name in names:
            deliverer = self.deliverers.get(name)
            if deliverer is not None:
                deliverer.nudge()

    def start(self) -> None:
        for deliverer in self.deliverers.values():
            deliverer.start()

    async def stop(self) -> None:
        """Deliverers first (their turns end), then what waits to be written."""
        for deliverer in self.deliverers.values():
            await deliverer.stop()
        await self.writer.flush()

    def families(self) -> Iterable[Any]:
        return self.counts.families(self._clock.seconds(), [w.name for w in self.webhooks])


async def open_webhooks(*, reactor: Any, config: Any, store: Any, files_pool: Any, tree: Any,
                        metrics: Any, deliver: bool = True) -> Webhooks:
    """The configured webhooks, started, a part of ``tree``: their secrets
    read, the outbox's own thread (and, for SQLite, its own connection, so
    that a sign-in's store calls never queue behind the outbox's writes),
    claims a killed daemon left on SQLite released."""
    from twisted.internet.task import LoopingCall

    from proxy.threads import Pool, Threaded

    secrets: dict[str, bytes] = {}
    posts: dict[str, Any] = {}
    for index, webhook in enumerate(config.webhooks):
        key = f"webhooks[{index}]"
        secrets[webhook.name] = await files_pool.submit(read_secret, webhook.secret_file,
                                                        f"{key}.secret_file")
        ca = None
        if webhook.ca_file is not None:
            ca = await files_pool.submit(read_ca, webhook.ca_file, f"{key}.ca_file")
        posts[webhook.name] = http_post(reactor, ca)
    pool = Pool(reactor, "outbox", threads=1, queue=1000)
    pool.start()
    try:
        if config.store.url is None:
            from proxy.store.sqlite import SQLiteStore

            own = await pool.submit(SQLiteStore, config.store.path)
        else:
            own = store
        if deliver:
            await pool.submit(own.forget_claims)
    except BaseException:
        pool.stop()
        raise
    hooks = Webhooks(clock=reactor, store=Threaded(own, pool), webhooks=config.webhooks,
                     secrets=secrets, posts=posts, node=node_id(),
                     writing=Threaded(outbox.Encoding(own), pool))
    metrics.watch(hooks.families)
    housekeeping = LoopingCall(lambda: Deferred.fromCoroutine(hooks.housekeeping.tick()))
    housekeeping.clock = reactor

    def start() -> None:
        if deliver:
            hooks.start()
            housekeeping.start(STATS_INTERVAL, now=True)

    async def stop() -> None:
        if housekeeping.running:
            housekeeping.stop()
        await hooks.stop()
        for post in posts.values():
            await post.close()
        if own is not store:
            await pool.submit(own.close)
        pool.stop()

    tree.part("webhooks", start=start, stop=lambda: Deferred.fromCoroutine(stop()))
    log.info("webhooks: {names}", names=", ".join(w.name for w in config.webhooks))
    return hooks
