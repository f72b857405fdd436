"""Throttling of failed sign-ins, per account and per source. No I/O, a
clock passed in: tests drive it with ``task.Clock``.

Per account: after ``account_failures`` distinct wrong secrets within
``failure_window`` the account is locked for ``lockout``, doubling on each
repeat up to ``lockout_max``.

- A wrong secret equal to one of the last ``ignore_repeats`` wrong ones does
  not count again (compared by keyed hash): a phone retrying a stale password
  every few minutes does not lock its owner out.
- Sources the account has signed in from before ("familiar") have counters
  of their own, so an attacker elsewhere cannot lock the owner out of the
  office.

Per source (an IPv4 address, or an IPv6 /48): each failure answer is delayed,
``source_delay`` at first, doubling up to ``source_delay_max``; forgotten after
``failure_window`` without failures. Trusted networks are exempt from both.

Unknown accounts are counted by the name typed, exactly like known ones, so
that lockouts do not tell which accounts exist.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator

import attrs

from proxy import store
from proxy.apppasswords import KeyedHash
from proxy.auth.cache import LRU
from proxy.config import ThrottleConfig
from proxy.wire import addresses

FAMILIAR_SOURCES = 16
MAX_TRACKED = 200_000
# Entries of the list of locked accounts before its expired ones go unread.
PRUNE_LOCKED = 1024
# App passwords one person may make in a minute: each costs an argon2 hash.
CREATIONS_PER_MINUTE = 10
MAX_CREATORS = 10_000


@attrs.define
class _Failure:
    when: float
    order: int  # when it was counted, in the Throttle's order of events
    source: str


@attrs.define
class _Bucket:
    failures: dict[bytes, _Failure] = attrs.Factory(dict)  # by the secret's digest
    # A few digests each (throttle.ignore_repeats): lists, not deques, whose
    # empty block alone is some 600 bytes, for every name tried.
    recent: list[bytes] = attrs.Factory(list)
    refused_upstream: list[bytes] = attrs.Factory(list)  # wrong by the directory's word
    locked_until: float = 0.0
    lockouts: int = 0
    last_failure: float = 0.0


@attrs.define
class _Account:
    familiar: OrderedDict[str, float] = attrs.Factory(OrderedDict)
    buckets: dict[bool, _Bucket] = attrs.Factory(lambda: {True: _Bucket(), False: _Bucket()})
    # Checks under way, by (source, digest): counted against the place their
    # source counts under *now*, so a source that becomes familiar while its
    # guesses are being checked takes them along.
    checking: dict[tuple[str, bytes], int] = attrs.Factory(dict)


@attrs.define
class _Source:
    failures: int = 0
    last_failure: float = 0.0


@attrs.define
class Reservation:
    """A secret being checked, counted by :meth:`Throttle.reserve` until
    :meth:`release`; ``order`` is when the check began."""

    account: _Account | None
    key: tuple[str, bytes]
    order: int
    familiar: bool = False  # the place it was counted against, when it was made

    def release(self) -> None:
        if self.account is None:
            return
        checking = self.account.checking
        left = checking.get(self.key, 0) - 1
        if left > 0:
            checking[self.key] = left
        else:
            checking.pop(self.key, None)
        self.account = None


def lockout_length(config: ThrottleConfig, lockouts: int) -> float:
    """How long the account is locked after ``lockouts`` earlier lockouts."""
    return store.lockout_length(config.lockout, config.lockout_max, lockouts)


class Throttle:
    def __init__(self, config: ThrottleConfig, clock: Callable[[], float],
                 digest_key: bytes | None = None) -> None:
        self.config = config
        self._clock = clock
        # Keys the digests of wrong secrets. Random (never leaves memory)
        # unless failures are counted in a shared store: then every process
        # must digest a secret alike (see docs/deployment.md).
        self._keyed = KeyedHash(digest_key or secrets.token_bytes(32))
        # Told of each new failure counted (account, familiar place?, digest,
        # when): the daemon counts it in the shared store too.
        self.on_failure: Callable[[str, bool, bytes, float], None] | None = None
        # Told when a sign-in from a familiar place forgives its failures
        # (account, their digests, counted before when): the shared store's too.
        self.on_forgiven: Callable[[str, list[bytes], float], None] | None = None
        self._known: LRU[str, _Account] = LRU(MAX_TRACKED, _Account)
        # Names that match no account are counted apart: spraying them cannot
        # push the lockouts of real accounts out of memory.
        self._unknown: LRU[str, _Account] = LRU(MAX_TRACKED, _Account)
        self._sources: LRU[str, _Source] = LRU(MAX_TRACKED, _Source)
        self._sources_of: dict[str, str | None] = {}  # address → source, parsed once
        # Accounts with a lockout, → until when (the help desk's list of
        # them). Expired entries go when it is read, and as it grows: when it
        # has twice the entries left after they last went (PRUNE_LOCKED at least).
        self._locked: dict[str, float] = {}
        self._prune_at = PRUNE_LOCKED
        self._order = itertools.count(1)
        self._alone: set[str] = set()  # accounts with a check that must run alone
        # Recent creations of app passwords, by who made them (an actor).
        self._creations: LRU[str, deque[float]] = LRU(MAX_CREATORS, deque)

    # -- sources ---------------------------------------------------------------

    def source(self, address: str) -> str | None:
        """The key a client address is counted under; None for trusted networks."""
        try:
            return self._sources_of[address]
        except KeyError:
            pass
        if len(self._sources_of) > 10_000:
            self._sources_of.clear()
        source = self._sources_of[address] = self._source(address)
        return source

    def _source(self, address: str) -> str | None:
        ip = addresses.ip(address)
        if ip is None:
            return address
        if any(ip in net for net in self.config.trusted_networks):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            net = ipaddress.IPv6Network((ip, self.config.ipv6_prefix), strict=False)
            return str(net)
        return str(ip)

    def failure_delay(self, address: str) -> float:
        """Count a failure from ``address``; how long to hold its answer back."""
        source = self.source(address)
        if source is None:
            return 0.0
        now = self._clock()
        state = self._sources.obtain(source)
        if now - state.last_failure > self.config.failure_window:
            state.failures = 0
        state.failures += 1
        state.last_failure = now
        delay = self.config.source_delay * 2 ** min(state.failures - 1, 30)
        return min(delay, self.config.source_delay_max)

    # -- accounts --------------------------------------------------------------

    def _table(self, account: str) -> LRU[str, _Account]:
        return self._unknown if account.startswith("unknown:") else self._known

    def digest(self, account: str, secret: str) -> bytes:
        return self._keyed.digest(account.encode() + b"\x00" + secret.encode("utf-8", "surrogateescape"))

    def locked(self, account: str, address: str) -> float:
        """Seconds the account stays locked for this source; 0 if it is not."""
        source = self.source(address)
        state = self._table(account).peek(account)
        if source is None or state is None:
            return 0.0
        bucket = state.buckets[source in state.familiar]
        return max(0.0, bucket.locked_until - self._clock())

    def locked_anywhere(self, account: str) -> float:
        """Seconds the account stays locked for the place that is locked longest."""
        state = self._table(account).peek(account)
        if state is None:
            return 0.0
        return max(0.0, *(b.locked_until - self._clock() for b in state.buckets.values()))

    def impose(self, account: str, familiar: bool, until: float) -> None:
        """A lockout decided elsewhere (another process sharing the store)."""
        bucket = self._table(account).obtain(account).buckets[familiar]
        if until > bucket.locked_until:
            bucket.locked_until = until
            bucket.failures.clear()
            self._note_locked(account, until)

    def forget(self, account: str) -> None:
        """Lift the account's lockouts and forget its failures (the help desk)."""
        self._locked.pop(account, None)  # listed even if its counts were let go since
        state = self._table(account).peek(account)
        if state is not None:
            state.buckets = {True: _Bucket(), False: _Bucket()}

    def recently_failed(self, account: str, address: str, secret: str) -> bool:
        """Whether ``secret`` is one of the account's last wrong ones from this
        kind of source: checking it again would only add a failure upstream
        (and lock the account in the directory, for a phone with a stale password)."""
        source = self.source(address)
        state = self._table(account).peek(account)
        if source is None or state is None:
            return False
        bucket = state.buckets[source in state.familiar]
        return self.digest(account, secret) in bucket.refused_upstream

    def reserve(self, account: str, address: str, secret: str) -> Reservation | None:
        """Count a secret about to be checked (by the directory, or against
        the app-password store) before the check is made: None if, with the
        checks already under way, it could take the account past its lockout
        (the check must not be made). Concurrent guesses therefore reach a
        check no more often than sequential ones, in whatever order their
        answers come. Release the reservation when the outcome is counted."""
        source = self.source(address)
        if source is None:
            return Reservation(None, ("", b""), next(self._order))
        state = self._table(account).obtain(account)
        familiar = source in state.familiar
        bucket = state.buckets[familiar]
        now = self._clock()
        if bucket.locked_until > now:
            return None  # locked while this attempt was on its way
        self._forget_old(bucket, now)
        digest = self.digest(account, secret)
        counted = self._counted(state, familiar)
        if digest not in counted and digest not in bucket.recent \
                and len(counted) >= self.config.account_failures:
            return None
        key = (source, digest)
        state.checking[key] = state.checking.get(key, 0) + 1
        return Reservation(state, key, next(self._order), familiar)

    def admits(self, account: str, address: str, secret: str) -> bool:
        """Whether a check of ``secret`` would be reserved now (a decision
        made at once, from memory, must respect the same budget). Cheap
        while the account has no failures to speak of."""
        source = self.source(address)
        state = self._table(account).peek(account)
        if source is None or state is None:
            return True
        familiar = source in state.familiar
        bucket = state.buckets[familiar]
        if bucket.locked_until > self._clock():
            return False
        if len(bucket.failures) + len(state.checking) < self.config.account_failures:
            return True
        digest = self.digest(account, secret)
        counted = self._counted(state, familiar)
        return digest in counted or digest in bucket.recent \
            or len(counted) < self.config.account_failures

    @staticmethod
    def _counted(state: _Account, familiar: bool) -> set[bytes]:
        """The distinct secrets that count against a place now: its
        failures, and the checks under way from sources counted there."""
        counted = set(state.buckets[familiar].failures)
        for source, digest in state.checking:
            if (source in state.familiar) == familiar:
                counted.add(digest)
        return counted

    def _forget_old(self, bucket: _Bucket, now: float) -> None:
        window = self.config.failure_window
        for digest, failure in list(bucket.failures.items()):
            if now - failure.when > window:
                del bucket.failures[digest]

    def failed(self, account: str, address: str, secret: str, upstream: bool = False,
               share: bool = True) -> bool:
        """Count a wrong secret (``upstream``: the directory said so); True if
        this failure locked the account. ``share``: also tell ``on_failure``."""
        source = self.source(address)
        if source is None:
            return False
        state = self._table(account).obtain(account)
        familiar = source in state.familiar
        bucket = state.buckets[familiar]
        if upstream:
            digest = self.digest(account, secret)
            if digest not in bucket.refused_upstream:
                bucket.refused_upstream.append(digest)
                while len(bucket.refused_upstream) > max(self.config.ignore_repeats, 1):
                    del bucket.refused_upstream[0]
        now = self._clock()
        window = self.config.failure_window
        if now - bucket.last_failure > window + self.config.lockout_max:
            bucket.lockouts = 0
        bucket.last_failure = now
        self._forget_old(bucket, now)
        digest = self.digest(account, secret)
        if digest in bucket.recent:
            return False
        if self.config.ignore_repeats:
            bucket.recent.append(digest)
            while len(bucket.recent) > self.config.ignore_repeats:
                del bucket.recent[0]
        bucket.failures[digest] = _Failure(now, next(self._order), source)
        if self.on_failure is not None and share:
            self.on_failure(account, familiar, digest, now)
        return self._lock_if_full(account, bucket, now)

    def _note_locked(self, account: str, until: float) -> None:
        # Names that match no account (and the stand-ins of accounts refused
        # whatever the secret) are not listed: spraying them cannot grow the
        # list, nor show in the gauge as accounts locked.
        if account.startswith("unknown:"):
            return
        self._locked[account] = max(until, self._locked.get(account, 0.0))
        if len(self._locked) >= self._prune_at:
            self._prune(self._clock())
            self._prune_at = max(PRUNE_LOCKED, 2 * len(self._locked))

    def _prune(self, now: float) -> None:
        for account in [a for a, until in self._locked.items() if until <= now]:
            del self._locked[account]

    def _lock_if_full(self, account: str, bucket: _Bucket, now: float) -> bool:
        if len(bucket.failures) < self.config.account_failures:
            return False
        # Never shorter than a lockout already in force (one another process
        # imposed, while checks begun before it refilled the count).
        bucket.locked_until = max(bucket.locked_until,
                                  now + lockout_length(self.config, bucket.lockouts))
        bucket.lockouts += 1
        bucket.failures.clear()
        self._note_locked(account, bucket.locked_until)
        return True

    @contextlib.contextmanager
    def alone(self, account: str) -> Iterator[bool]:
        """One check at a time for the account where checks must not run in
        parallel (the portal's second-factor codes, which a reservation by
        secret would not hold back): yields False, and holds nothing, while
        another is under way."""
        if account in self._alone:
            yield False
            return
        self._alone.add(account)
        try:
            yield True
        finally:
            self._alone.discard(account)

    # -- making app passwords ---------------------------------------------------------

    def may_create(self, actor: str) -> bool:
        """Count an app password ``actor`` is about to make: False, and
        nothing counted, past :data:`CREATIONS_PER_MINUTE` in the last
        minute. A forgotten actor (past :data:`MAX_CREATORS`) starts again,
        gaining at most one minute's worth."""
        now = self._clock()
        made = self._creations.obtain(actor)
        while made and now - made[0] >= 60.0:
            made.popleft()
        if len(made) >= CREATIONS_PER_MINUTE:
            return False
        made.append(now)
        return True

    # -- the help desk -------------------------------------------------------------

    def locked_accounts(self) -> list[tuple[str, float]]:
        """The accounts locked now (somewhere: their familiar places or the
        rest) and the seconds each stays locked, longest first."""
        now = self._clock()
        self._prune(now)
        return sorted(((a, until - now) for a, until in self._locked.items()),
                      key=lambda pair: -pair[1])

    def succeeded(self, account: str, address: str, since: int | None = None) -> None:
        """A sign-in worked: the source becomes familiar, and that place
        forgives the failures counted before the sign-in's check began
        (``since``, a :class:`Reservation`'s order; None: now). Failures
        counted while it was under way, and checks still under way, are
        guesses made beside it: they stay counted, so a right secret
        among a burst of guesses does not open the way for more."""
        source = self.source(address)
        if source is None:
            return
        now = self._clock()
        since = next(self._order) if since is None else since
        state = self._table(account).obtain(account)
        was_familiar = source in state.familiar
        state.familiar[source] = now
        state.familiar.move_to_end(source)
        while len(state.familiar) > FAMILIAR_SOURCES:
            state.familiar.popitem(last=False)
        home = state.buckets[True]
        if was_familiar:
            if home.locked_until > now:
                return  # locked by guesses made beside this sign-in
            if not home.failures and not home.lockouts and not home.recent:
                return  # nothing to forgive (a device signing in, again and again)
            kept = {d: f for d, f in home.failures.items() if f.order > since}
            state.buckets[True] = _Bucket(
                failures=kept,
                recent=[d for d in home.recent if d in kept],
                refused_upstream=[d for d in home.refused_upstream if d in kept],
                last_failure=home.last_failure,
            )
            if self.on_forgiven is not None:
                # These, no others: those counted beside the sign-in, and
                # other processes' (which this one never saw), stay there.
                self.on_forgiven(account, [d for d in home.failures if d not in kept],
                                 min((f.when for f in kept.values()), default=now))
        else:
            # A new familiar place: its guesses made beside this sign-in go
            # with it; a success from elsewhere leaves the familiar counter
            # as it is otherwise.
            for digest, failure in state.buckets[False].failures.items():
                if failure.source == source and failure.order > since:
                    home.failures.setdefault(digest, failure)
            if home.locked_until <= now:
                self._lock_if_full(account, home, now)
