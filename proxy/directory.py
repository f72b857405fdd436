"""The upstream directory: finds accounts, reads their groups and state, checks
primary passwords. OpenLDAP and Active Directory, through ldaptor.

Two small pools of persistent connections, each connection kept up by a
Twisted ``ClientService`` (reconnects with backoff):

- the *search* pool, bound as the service account, resolves user names to
  accounts;
- the *bind* pool checks primary passwords by binding as the user; the next
  check binds again on the same connection (re-bound, not reopened).

Every operation has a timeout; a connection whose operation timed out is
dropped, since its state is no longer known. Callers wait their turn for a
connection (:class:`Lender`) at most that timeout too, and every waiter is
answered, however long the queue, whatever fails. While connections fail, calls
fail at once with :class:`DirectoryUnavailable` instead of queueing behind
the backoff, so the authentication core can answer with a temporary failure
(or, for app passwords, go on with what it last knew).
"""

from __future__ import annotations

import urllib.parse
from collections import deque
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldaperrors
from ldaptor.protocols.ldap.distinguishedname import DistinguishedName
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from ldaptor.ldapfilter import parseFilter
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from proxy.apppasswords import canonical_username
from proxy.config import DirectoryConfig
from proxy.transports import tcp_endpoint
from proxy.wire.dn import normalise_dn
from proxy.tls import client_options

log = Logger(namespace="legacy_auth_proxy.directory")


class DirectoryUnavailable(Exception):
    """The directory could not answer in time: a temporary failure, not a refusal."""


class DirectoryBusy(DirectoryUnavailable):
    """Every pooled connection stayed in use for ``directory.timeout``: the
    proxy is short of connections, which says nothing of the directory."""


@attrs.frozen
class Account:
    """A user as the directory describes them, at one moment."""

    dn: str
    username: str  # the store's key: canonical value of directory.username_attribute
    active: bool
    groups: frozenset[str] = frozenset()  # normalised DNs
    mfa_enforced: bool = False
    modern_auth_only: bool = False
    admin: bool = False
    password_changed_at: float | None = None
    mail: str | None = None  # where the portal's notifications go
    # Why the account is not active, when the directory said why (Active
    # Directory: disabled, locked, expired, password_must_change).
    inactive_reason: str | None = None
    # The DN in one comparable form, parsed once: ldaptor's DN parser is slow.
    key: str = attrs.field(
        default=attrs.Factory(lambda self: normalise_dn(self.dn), takes_self=True), repr=False
    )


# -- pure helpers --------------------------------------------------------------


def escape_filter_value(value: str) -> str:
    """RFC 4515 section 3: escape what would change a filter.

    Beyond the required ``\\ * ( )`` and NUL, every ASCII character other
    than letters, digits and ``-._@+`` is escaped too: spaces and tabs would
    otherwise be trimmed or expanded by the filter parser."""
    out = []
    for ch in value:
        if ch.isascii() and not (ch.isalnum() or ch in "-._@+"):
            out.append("\\%02x" % ord(ch))
        else:
            out.append(ch)
    return "".join(out)


def parse_password_changed(value: bytes) -> float | None:
    """pwdChangedTime (GeneralizedTime, ``20261122010203Z``) or Active
    Directory's pwdLastSet (100 ns ticks since 1601) → POSIX seconds."""
    text = value.decode("ascii", "replace").strip()
    if text.isdigit() and len(text) > 14:
        ticks = int(text)
        return ticks / 10_000_000 - 11_644_473_600 if ticks else None
    if text.endswith("Z") and len(text) >= 15:
        main, _, fraction = text[:-1].partition(".")
        try:
            moment = datetime.strptime(main[:14], "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
        except ValueError:
            return None
        return moment.timestamp() + (float("0." + fraction) if fraction.isdigit() else 0.0)
    return None


# Active Directory's marks (MS-ADTS 2.2.16, MS-ADA1): the flag of a disabled
# account in userAccountControl, and accountExpires' two values for never.
UF_ACCOUNTDISABLE = 0x2
NEVER_EXPIRES = (0, 0x7FFFFFFFFFFFFFFF)


def filetime(ticks: int) -> float:
    """Active Directory's 100 ns ticks since 1601 → POSIX seconds."""
    return ticks / 10_000_000 - 11_644_473_600


@attrs.frozen
class Domain:
    """What an Active Directory domain says of itself, read once."""

    dn: str
    dns_name: str  # samdom.example.com, from the domain's DN
    netbios: str | None  # SAMDOM
    # How long AD keeps an account locked after its lockoutTime (None: until
    # an administrator unlocks it), and after how many wrong passwords.
    lockout_duration: float | None
    lockout_threshold: int
    # The configured groups' objectSid → their normalised DN.
    group_sids: dict[bytes, str] = attrs.field(factory=dict)

    def names_for(self, typed: str) -> list[str] | None:
        """The names a typed sign-in name stands for: ``DOMAIN\\sam`` is
        ``sam`` (None: another domain's user, nobody here), and
        ``sam@<the domain's DNS name>`` is that UPN or the ``sam`` AD takes
        it for when no UPN claims it."""
        if "\\" in typed:
            prefix, _, rest = typed.partition("\\")
            if self.netbios is None or prefix.casefold() != self.netbios.casefold() or not rest:
                return None
            return [rest]
        local, at, suffix = typed.rpartition("@")
        if at and local and suffix.casefold() == self.dns_name.casefold():
            return [typed, local]
        return [typed]


def ad_inactive_reason(first: Any, now: float, domain: Domain) -> str | None:
    """Why Active Directory would not let this account sign in, read from
    its entry (``first(attribute)``: the attribute's first value): None if
    nothing stops it."""

    def number(attribute: str) -> int | None:
        value = first(attribute)
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    if (number("userAccountControl") or 0) & UF_ACCOUNTDISABLE:
        return "disabled"
    locked_at = number("lockoutTime") or 0
    # lockoutTime stays set after the lockout lapses until the next sign-in:
    # locked only within the domain's lockout duration.
    if locked_at and (domain.lockout_duration is None
                      or now < filetime(locked_at) + domain.lockout_duration):
        return "locked"
    expires = number("accountExpires")
    if expires is not None and expires not in NEVER_EXPIRES and filetime(expires) <= now:
        return "expired"
    if number("pwdLastSet") == 0:
        return "password_must_change"
    return None


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def looks_like_dn(name: str) -> bool:
    if "=" not in name:
        return False
    try:
        return len(DistinguishedName(name).split()) > 0
    except Exception:
        return False


# -- connections ---------------------------------------------------------------


def client_endpoint(reactor: Any, config: DirectoryConfig, tls: Any) -> Any:
    """Where the directory is: TCP, wrapped in TLS for ldaps://."""
    parts = urllib.parse.urlsplit(config.url)
    host = parts.hostname or ""
    port = parts.port or (636 if parts.scheme == "ldaps" else 389)
    plain = tcp_endpoint(reactor, host, port, config.timeout)
    if parts.scheme == "ldaps":
        return endpoints.wrapClientTLS(tls, plain)
    return plain


def tls_options(config: DirectoryConfig, ca_pem: bytes | None) -> Any:
    return client_options(urllib.parse.urlsplit(config.url).hostname or "", ca_pem)


class _Client(LDAPClient):
    """ldaptor's client, telling its owner when the connection is gone."""

    on_lost: Any = None

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if self.on_lost is not None:
            self.on_lost(self)


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection

    def buildProtocol(self, addr: Any) -> _Client:
        client = _Client()
        client.factory = self
        client.on_lost = self.connection.lost
        self.connection._latest = client
        return client


class _Connection:
    """One persistent connection, kept up by a ClientService."""

    def __init__(self, pool: _Pool, index: int) -> None:
        self.pool = pool
        self.current: _Client | None = None
        self._latest: _Client | None = None
        self.service = ClientService(
            pool.endpoint,
            _ClientFactory(self),
            # A directory that comes back is noticed within maxDelay.
            retryPolicy=backoffPolicy(initialDelay=0.25, maxDelay=5.0),
            clock=pool.reactor,
            prepareConnection=self._prepare,
        )
        self.name = f"{pool.name}-{index}"

    async def _prepare_async(self, client: LDAPClient) -> None:
        if self.pool.start_tls:
            response = await self.pool.timed(client.send(pureldap.LDAPStartTLSRequest()))
            if response.resultCode != 0:
                raise ldaperrors.get(response.resultCode, response.errorMessage)
            client.transport.startTLS(self.pool.tls)
        if self.pool.bind_dn is not None:
            await self.pool.timed(client.bind(self.pool.bind_dn, self.pool.bind_password))
        # ClientService hands prepareConnection a proxy of the protocol; keep
        # the protocol itself, which is what reports its loss.
        self.current = self._latest
        self.pool.up(self)

    def lost(self, client: _Client) -> None:
        if self.current is client:
            self.current = None

    def _prepare(self, client: LDAPClient) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._prepare_async(client))

        def failed(failure: Any) -> Any:
            self.pool.down(self, failure.getErrorMessage())
            # ClientService schedules its retry as soon as this fails; the
            # loss of the connection, reported to it afterwards too, would be
            # a transition its machine does not have (NoTransition,
            # _clientDisconnected in Waiting, logged as critical). Its proxy
            # of our protocol carries that report: silence it first.
            if hasattr(client, "_lostNotification"):
                client._lostNotification = _ignore
            client.transport.abortConnection()
            return failure

        return d.addErrback(failed)

    async def client(self) -> LDAPClient:
        if self.pool.stopping:
            raise DirectoryUnavailable(f"{self.pool.name}: stopping")
        if self.current is None and self.pool.failing_since is not None:
            # Known to be down: answer now rather than wait out the backoff;
            # the service keeps retrying and notices the directory's return.
            raise DirectoryUnavailable(f"{self.pool.name}: {self.pool.last_error}")
        try:
            client = await self.pool.timed(self.service.whenConnected(failAfterFailures=1))
        except Exception as e:
            self.pool.down(self, str(e) or type(e).__name__)
            raise DirectoryUnavailable(f"{self.pool.name}: cannot connect") from None
        if client is not self.current:
            # Dropped a moment ago; ClientService hears of the loss on the
            # next turn of the reactor.
            raise DirectoryUnavailable(f"{self.pool.name}: reconnecting")
        return client

    def drop(self, client: LDAPClient) -> None:
        if self.current is client:
            self.current = None
        if client.transport is not None:
            client.transport.abortConnection()


def _ignore(*args: Any) -> None:
    pass


# A holder connects (timed) then runs one operation (timed): held longer than
# this many timeouts, a connection is taken to be stuck.
STUCK_AFTER = 4


class _Waiter:
    """A caller waiting for a connection; ``offered`` is set while the pool
    hands it one, and taken back by the caller as it wakes."""

    __slots__ = ("deferred", "offered", "queued", "deadline")

    def __init__(self, deadline: float) -> None:
        self.deferred: Deferred[None] = Deferred()
        self.offered: Any = None
        self.queued = True
        self.deadline = deadline


class Lender:
    """A fixed set of connections lent one holder at a time, to callers in
    the order they asked; no I/O, the clock passed in.

    A returned connection goes to the next waiter within the same call, but
    never by recursion: a waiter that gives it back at once (the directory
    is down, say) only puts it back, and the loop already handing out passes
    it on. A queue of any length drains in flat stack depth. A hand-off
    that breaks before its waiter took the connection puts it back, and a
    waiter that wakes to find nothing offered fails instead of using what
    another holds: a connection is idle, or held by exactly one caller.
    """

    def __init__(self, clock: Any, name: str, connections: Iterable[Any], timeout: float) -> None:
        self._clock = clock
        self.name = name
        self.timeout = timeout
        self._idle: deque[Any] = deque(connections)
        self.size = len(self._idle)
        self._held: dict[Any, float] = {}  # connection → since when
        self._waiting: deque[_Waiter] = deque()
        self._gone = 0  # waiters in _waiting that stopped waiting
        self._handing = False
        # One timer for the whole queue: waiters wait the same time, so the
        # first in line is always the first due.
        self._timer: Any = None

    @property
    def waiting(self) -> int:
        return len(self._waiting) - self._gone

    def idle(self) -> int:
        return len(self._idle)

    def held(self) -> int:
        return len(self._held)

    def longest_held(self) -> float:
        """How long the connection held longest has been held (0: none is)."""
        return self._clock.seconds() - min(self._held.values()) if self._held else 0.0

    async def acquire(self) -> Any:
        """A connection, lent until :meth:`release`. Raises
        :class:`DirectoryBusy` if none comes back within the timeout."""
        if self._idle and not self._handing:
            connection = self._idle.popleft()
            self._held[connection] = self._clock.seconds()
            return connection
        waiter = _Waiter(self._clock.seconds() + self.timeout)
        self._waiting.append(waiter)
        if self._timer is None:
            self._timer = self._clock.callLater(self.timeout, self._expire)
        try:
            await waiter.deferred
        except BaseException:
            if waiter.queued:
                # Cancelled by its caller: its entry is skipped when reached.
                self._gone += 1
                self._compact()
            raise
        connection, waiter.offered = waiter.offered, None
        if connection is None:
            # Woken after its hand-off was taken back: nothing is ours.
            raise DirectoryUnavailable(f"{self.name}: hand-off lost")
        return connection

    def release(self, connection: Any) -> None:
        if self._held.pop(connection, None) is None:
            log.error("{pool}: a connection given back twice", pool=self.name)
            return
        self._idle.append(connection)
        self._hand_out()

    def _hand_out(self) -> None:
        if self._handing:
            return  # the loop below, further up the stack, passes it on
        self._handing = True
        try:
            while self._idle and self._waiting:
                waiter = self._waiting.popleft()
                waiter.queued = False
                if waiter.deferred.called:
                    self._gone -= 1
                    continue
                connection = self._idle.popleft()
                self._held[connection] = self._clock.seconds()
                waiter.offered = connection
                try:
                    self._deliver(waiter)
                except BaseException:
                    log.failure("{pool}: a hand-off failed", pool=self.name)
                finally:
                    if waiter.offered is connection:
                        # The waiter never took it: back to the front.
                        waiter.offered = None
                        del self._held[connection]
                        self._idle.appendleft(connection)
                        if not waiter.deferred.called:
                            waiter.deferred.errback(
                                DirectoryUnavailable(f"{self.name}: hand-off lost"))
        finally:
            self._handing = False

    def _deliver(self, waiter: _Waiter) -> None:
        """Wake ``waiter``, which takes ``waiter.offered`` as it runs."""
        waiter.deferred.callback(None)

    def _expire(self) -> None:
        """Fail the waiters that waited their whole timeout, first in line
        first, one after the other."""
        self._timer = None
        now = self._clock.seconds()
        while self._waiting:
            waiter = self._waiting[0]
            if waiter.deferred.called:
                self._waiting.popleft()
                waiter.queued = False
                self._gone -= 1
                continue
            if waiter.deadline > now:
                break
            self._waiting.popleft()
            waiter.queued = False
            waiter.deferred.errback(DirectoryBusy(f"{self.name}: every connection is busy"))
        if self._waiting and self._timer is None:
            self._timer = self._clock.callLater(
                max(0.0, self._waiting[0].deadline - now), self._expire)

    def _compact(self) -> None:
        # Waiters that timed out stay queued until reached; keep them from
        # outnumbering the live ones.
        if self._gone > 64 and self._gone * 2 > len(self._waiting):
            self._waiting = deque(w for w in self._waiting if not w.deferred.called)
            self._gone = 0

    def problems(self) -> list[str]:
        """Why this pool cannot serve, if it cannot. Every step of a holder
        is timed (connecting, the operation), so a connection held for
        more than a few timeouts is one nobody will give back."""
        problems = []
        if len(self._idle) + len(self._held) != self.size:
            problems.append(f"{self.name}: {self.size - len(self._idle) - len(self._held)} "
                            f"connection(s) lost")
        stuck = sum(1 for since in self._held.values()
                    if self._clock.seconds() - since > STUCK_AFTER * self.timeout)
        if stuck:
            problems.append(f"{self.name}: {stuck} connection(s) held for more than "
                            f"{STUCK_AFTER * self.timeout:g} s")
        return problems


class _Pool:
    """``size`` connections to the directory, lent one caller at a time."""

    def __init__(
        self,
        reactor: Any,
        name: str,
        config: DirectoryConfig,
        tls: Any,
        size: int,
        bind_dn: str | None,
        bind_password: str,
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.timeout = config.timeout
        self.tls = tls
        self.start_tls = config.start_tls and config.url.startswith("ldap://")
        self.endpoint = client_endpoint(reactor, config, tls)
        self.bind_dn = bind_dn
        self.bind_password = bind_password
        self._all = [_Connection(self, i) for i in range(size)]
        self.lender = Lender(reactor, name, self._all, config.timeout)
        self.failing_since: float | None = None
        self.last_error = ""
        self.stopping = False  # stop asked: failures from now on are the stop's
        self._stopped = False
        self._stop_waiters: list[Deferred[None]] = []

    def timed(self, d: Deferred[Any]) -> Deferred[Any]:
        return d.addTimeout(self.timeout, self.reactor)

    def up(self, connection: _Connection) -> None:
        if self.failing_since is not None:
            log.info("{pool}: the directory answers again", pool=self.name)
        self.failing_since = None

    def down(self, connection: _Connection, error: str) -> None:
        if self.stopping:
            return  # closed by us, not unreachable
        if self.failing_since is None:
            self.failing_since = self.reactor.seconds()
            log.warn("{pool}: the directory is unreachable: {error}", pool=self.name, error=error)
        self.last_error = error

    def start(self) -> None:
        for c in self._all:
            c.service.startService()

    def stop(self) -> Deferred[None]:
        """Stop every connection: once, however often asked, whatever is in
        flight; each caller's Deferred fires when all are closed."""
        waiter: Deferred[None] = Deferred()
        if self._stopped:
            waiter.callback(None)
            return waiter
        self._stop_waiters.append(waiter)
        if not self.stopping:
            self.stopping = True
            # Asked from inside one of ClientService's own transitions (a
            # caller it woke with a failure goes on to shut down, as a test's
            # teardown does), stopService would run its state machine
            # re-entrantly, which automat refuses ("attempting to reentrantly
            # run _Client.stop"): stop on a turn of the reactor of our own.
            self.reactor.callLater(0, self._stop_services)
        return waiter

    def _stop_services(self) -> None:
        stopping = [defer.maybeDeferred(c.service.stopService) for c in self._all]
        # A close waits for the directory (TLS for its close_notify): one that
        # no longer answers would hold the stop for ever. Abort after the timeout.
        aborting = self.reactor.callLater(self.timeout, self._abort)
        done = defer.DeferredList(stopping, consumeErrors=True)

        def finished(results: Any) -> None:
            if aborting.active():
                aborting.cancel()
            for ok, failure in results:
                if not ok:
                    log.info("{pool}: a connection stopped uncleanly: {error}",
                             pool=self.name, error=failure.getErrorMessage())
            self._stopped = True
            self._stop_waiters, waiters = [], self._stop_waiters
            for waiter in waiters:
                waiter.callback(None)

        done.addCallback(finished)

    def _abort(self) -> None:
        for c in self._all:
            client = c._latest
            # Only a connection still open: TLS refuses to abort one it has
            # already torn down.
            if client is not None and client.connected and client.transport is not None:
                client.transport.abortConnection()

    async def acquire(self) -> _Connection:
        connection: _Connection = await self.lender.acquire()
        return connection

    def release(self, connection: _Connection) -> None:
        self.lender.release(connection)


# -- the directory ---------------------------------------------------------------


# What an Active Directory account's state is read from.
AD_STATE_ATTRIBUTES = ("userAccountControl", "lockoutTime", "accountExpires", "pwdLastSet")


class _ActiveDirectory:
    """What Active Directory says of itself, read once (its names, lockout
    policy, the configured groups' SIDs), and of a user's groups, nested
    and primary included: part of :class:`Directory`."""

    async def _domain_of(self, client: LDAPClient) -> Domain:
        """The Active Directory domain's facts, read on the first look-up
        (and again until that succeeds): its name and NetBIOS name, its
        lockout duration and threshold, the configured groups' SIDs."""
        if self._domain is not None:
            return self._domain
        root = await self._search_entries(
            client, "", pureldap.LDAP_SCOPE_baseObject, "(objectClass=*)",
            ["defaultNamingContext", "configurationNamingContext"])
        if len(root) != 1 or root[0] is None:
            raise ldaperrors.LDAPOther("no root DSE")
        domain_dn = self._value(root[0], "defaultNamingContext") or ""
        configuration = self._value(root[0], "configurationNamingContext") or ""
        found = await self._search_entries(
            client, domain_dn, pureldap.LDAP_SCOPE_baseObject, "(objectClass=domain)",
            ["lockoutDuration", "lockoutThreshold"])
        if len(found) != 1 or found[0] is None:
            raise ldaperrors.LDAPOther(f"cannot read the domain object {domain_dn}")
        duration = int(self._value(found[0], "lockoutDuration") or 0)
        threshold = int(self._value(found[0], "lockoutThreshold") or 0)
        netbios = self.config.netbios_domain
        if netbios is None:
            crossref = await self._search_entries(
                client, f"CN=Partitions,{configuration}", pureldap.LDAP_SCOPE_singleLevel,
                f"(&(objectClass=crossRef)(nCName={escape_filter_value(domain_dn)}))",
                ["nETBIOSName"])
            if len(crossref) == 1 and crossref[0] is not None:
                netbios = self._value(crossref[0], "nETBIOSName")
            if netbios is None:
                log.warn("the domain's NetBIOS name cannot be read: DOMAIN\\user names "
                         "match nobody; set directory.netbios_domain")
        group_sids = {}
        for key in ("mfa", "modern", "admin"):
            group = self._groups[key]
            if group is None:
                continue
            entries = await self._search_entries(
                client, group, pureldap.LDAP_SCOPE_baseObject, "(objectClass=group)", ["objectSid"])
            sid = self._raw(entries[0], "objectSid") if len(entries) == 1 and entries[0] else None
            if sid is None:
                # Fail closed: a group whose members cannot be told would
                # let its members sign in as if outside it.
                log.error("the group {group} is not in the directory, or has no objectSid "
                          "the service account may read", group=group)
                raise ldaperrors.LDAPOther(f"group {group} not found")
            group_sids[sid] = group
        self._domain = Domain(
            dn=domain_dn,
            dns_name=".".join(v for k, v in (part.split("=", 1) for part in
                              normalise_dn(domain_dn).split(",")) if k == "dc"),
            netbios=netbios,
            # lockoutDuration is negative ticks; 0 and the most negative
            # value both mean until an administrator unlocks it.
            lockout_duration=-duration / 10_000_000 if -(1 << 63) < duration < 0 else None,
            lockout_threshold=threshold,
            group_sids=group_sids,
        )
        log.info("Active Directory domain {dns} ({netbios}): accounts lock after {threshold} "
                 "wrong passwords", dns=self._domain.dns_name, netbios=netbios,
                 threshold=threshold)
        return self._domain

    async def _token_groups(self, client: LDAPClient, dn: str) -> set[bytes]:
        """The SIDs of every group the user is in, nested groups and the
        primary group included: AD's ``tokenGroups``, read on the entry
        itself (AD constructs it only for a base search)."""
        entries = await self._search_entries(
            client, dn, pureldap.LDAP_SCOPE_baseObject, "(objectClass=*)", ["tokenGroups"])
        sids: set[bytes] = set()
        if len(entries) == 1 and entries[0] is not None:
            for name, values in entries[0].attributes:
                if _text(name).lower() == "tokengroups":
                    sids.update(v if isinstance(v, bytes) else str(v).encode("latin-1")
                                for v in values)
        if not sids:
            # Every account is in its primary group at least: none at all
            # means the service account may not read them. Refuse to guess.
            log.error("cannot read tokenGroups of {dn}: the service account needs to "
                      "(see docs/active-directory.md)", dn=dn)
            raise ldaperrors.LDAPInsufficientAccessRights("tokenGroups not readable")
        return sids


class Directory(_ActiveDirectory):
    """Resolves accounts and checks primary passwords against the directory."""

    ATTRIBUTES_ALWAYS = ("objectClass",)

    def __init__(
        self, reactor: Any, config: DirectoryConfig, bind_password: str, ca_pem: bytes | None,
        metrics: Any = None,
    ) -> None:
        self.config = config
        self._reactor = reactor
        self.metrics = metrics  # proxy.metrics.Metrics, where the daemon exports them
        tls = tls_options(config, ca_pem)
        size = config.pool_size
        self._search = _Pool(
            reactor, "directory-search", config, tls, size, config.bind_dn, bind_password
        )
        self._bind = _Pool(reactor, "directory-bind", config, tls, size, None, "")
        self._groups = {
            "mfa": normalise_dn(config.mfa_group) if config.mfa_group else None,
            "modern": normalise_dn(config.modern_auth_only_group)
            if config.modern_auth_only_group
            else None,
            "admin": normalise_dn(config.admin_group) if config.admin_group else None,
        }
        self._attributes = [
            a
            for a in (
                config.username_attribute,
                config.member_of_attribute,
                config.password_changed_attribute,
                config.mail_attribute,
            )
            if a
        ]
        self._active_directory = config.kind == "active_directory"
        if self._active_directory:
            self._attributes += [a for a in AD_STATE_ATTRIBUTES if a not in self._attributes]
        self._domain: Domain | None = None

    @staticmethod
    def read_bind_password(path: Path) -> str:
        return path.read_text(encoding="utf-8").rstrip("\r\n")

    def start(self) -> None:
        self._search.start()
        self._bind.start()

    async def stop(self) -> None:
        """Close every connection; safe to ask again, and from anywhere."""
        await defer.gatherResults([self._search.stop(), self._bind.stop()])

    def up(self) -> bool:
        """Whether the directory answered the last time it was asked."""
        return self._search.failing_since is None and self._bind.failing_since is None

    def answering(self) -> bool:
        """Whether the directory answers account look-ups: nothing failed on
        the search pool since it last connected. While this holds, a
        :class:`DirectoryUnavailable` from :meth:`resolve` means the pool was
        busy or the directory answered with an error, not that it is out of
        reach: no reason to go on with what it said before."""
        return self._search.failing_since is None

    def pool_problems(self) -> list[str]:
        """Why the pools cannot serve (empty: they can): a connection held
        far longer than any operation may take, or one gone missing."""
        return self._search.lender.problems() + self._bind.lender.problems()

    def down_since(self) -> float | None:
        """Since when the directory has not answered (None: it does)."""
        times = [t for t in (self._search.failing_since, self._bind.failing_since) if t is not None]
        return min(times) if times else None

    async def _run(self, pool: _Pool, operation: Any) -> Any:
        """Run ``operation(client)`` on a connection of ``pool``."""
        started = self._reactor.seconds()
        try:
            return await self._run_timed(pool, operation)
        finally:
            if self.metrics is not None:
                self.metrics.directory_round_trip(pool.name, self._reactor.seconds() - started)

    async def _run_timed(self, pool: _Pool, operation: Any) -> Any:
        connection = await pool.acquire()
        try:
            client = await connection.client()
            try:
                return await pool.timed(Deferred.fromCoroutine(operation(client)))
            except (defer.TimeoutError, defer.CancelledError):
                connection.drop(client)
                pool.down(connection, "timed out")
                raise DirectoryUnavailable(f"{pool.name}: timed out") from None
            except ldaperrors.LDAPException:
                raise
            except Exception as e:
                # The connection went away under the operation (a directory
                # stopped or restarting): out of reach until one connects again.
                connection.drop(client)
                pool.down(connection, type(e).__name__)
                raise DirectoryUnavailable(f"{pool.name}: {type(e).__name__}") from None
        finally:
            pool.release(connection)

    async def _search_entries(
        self, client: LDAPClient, base: str, scope: int, filter_text: str, attributes: Iterable[str],
        size_limit: int = 2,
    ) -> list[pureldap.LDAPSearchResultEntry | None]:
        entries: list[pureldap.LDAPSearchResultEntry | None] = []  # None: more matches
        done: Deferred[None] = Deferred()

        def handle(message: Any) -> bool:
            if isinstance(message, pureldap.LDAPSearchResultEntry):
                entries.append(message)
                return False
            if isinstance(message, pureldap.LDAPSearchResultDone):
                code = message.resultCode
                # noSuchObject (32): the base does not exist, i.e. no such user;
                # sizeLimitExceeded (4): more than one match, i.e. none.
                if code == 4:
                    entries.append(None)
                if code not in (0, 4, 32):
                    done.errback(ldaperrors.get(code, message.errorMessage))
                else:
                    done.callback(None)
                return True
            return False  # references: not followed

        request = pureldap.LDAPSearchRequest(
            baseObject=base,
            scope=scope,
            derefAliases=pureldap.LDAP_DEREF_neverDerefAliases,
            sizeLimit=size_limit,
            timeLimit=max(1, int(self.config.timeout)),
            typesOnly=False,
            filter=parseFilter(filter_text),
            attributes=list(attributes),
        )
        sent = client.send_multiResponse(request, handle)

        def lost(failure: Any) -> None:
            # The connection went away mid-search: ldaptor fails the request.
            if not done.called:
                done.errback(failure)

        sent.addErrback(lost)
        await done
        return entries

    async def resolve(self, username: str) -> Account | None:
        """The account a client's user name stands for, or None if there is
        no such user (or the name matches more than one). Raises
        :class:`DirectoryUnavailable`."""
        by_dn = self._under_user_base(username)
        if by_dn:
            # A sign-in by full DN: that entry itself.
            base, scope, user_filter = username, pureldap.LDAP_SCOPE_baseObject, "(objectClass=*)"
        else:
            base, scope = self.config.user_base, pureldap.LDAP_SCOPE_wholeSubtree
            user_filter = self._user_filter(username)

        async def operation(client: LDAPClient) -> Account | None:
            nonlocal user_filter
            domain = await self._domain_of(client) if self._active_directory else None
            if domain is not None and not by_dn:
                names = domain.names_for(username)
                if names is None:
                    return None  # DOMAIN\user of another domain
                # Every form names one account: more than one match is none.
                user_filter = "".join(self._user_filter(n) for n in names)
                if len(names) > 1:
                    user_filter = f"(|{user_filter})"
            found = await self._search_entries(client, base, scope, user_filter, self._attributes)
            if len(found) != 1 or found[0] is None:
                return None
            entry = found[0]
            if scope == pureldap.LDAP_SCOPE_baseObject:
                # A sign-in by DN must match the user filter like any other:
                # look the entry up again by its name, and require the same DN.
                name = self._value(entry, self.config.username_attribute)
                if name is None:
                    return None
                again = await self._search_entries(
                    client,
                    self.config.user_base,
                    pureldap.LDAP_SCOPE_wholeSubtree,
                    self._user_filter(name),
                    self._attributes,
                )
                if (len(again) != 1 or again[0] is None
                        or normalise_dn(_text(again[0].objectName)) != normalise_dn(_text(entry.objectName))):
                    return None
                entry = again[0]
            active = True
            if self.config.active_filter:
                still = await self._search_entries(
                    client,
                    _text(entry.objectName),
                    pureldap.LDAP_SCOPE_baseObject,
                    self.config.active_filter,
                    ["1.1"],
                )
                active = len(still) == 1
            token_groups = None
            if domain is not None and domain.group_sids:
                token_groups = await self._token_groups(client, _text(entry.objectName))
            return self._account(entry, active, domain, token_groups)

        try:
            return await self._run(self._search, operation)
        except ldaperrors.LDAPException as e:
            log.warn("directory search failed: {error}", error=str(e))
            raise DirectoryUnavailable("search failed") from None

    async def find(self, text: str, limit: int) -> list[str]:
        """The user names (``directory.username_attribute``, canonical) of
        up to ``limit`` accounts whose name, mail or any name form the user
        filter matches contains ``text``: the help desk's search. Raises
        :class:`DirectoryUnavailable`."""
        wanted = text.strip()
        if not wanted:
            return []
        substring = self.config.user_filter.replace(
            "{username}", "*" + escape_filter_value(wanted) + "*")

        async def operation(client: LDAPClient) -> list[str]:
            found = await self._search_entries(
                client, self.config.user_base, pureldap.LDAP_SCOPE_wholeSubtree, substring,
                [self.config.username_attribute], size_limit=limit)
            names = {canonical_username(name) for entry in found if entry is not None
                     if (name := self._value(entry, self.config.username_attribute))}
            return sorted(names)

        try:
            return await self._run(self._search, operation)
        except ldaperrors.LDAPException as e:
            log.warn("directory search failed: {error}", error=str(e))
            raise DirectoryUnavailable("search failed") from None

    def _user_filter(self, name: str) -> str:
        return self.config.user_filter.replace("{username}", escape_filter_value(name))

    @staticmethod
    def _raw(entry: pureldap.LDAPSearchResultEntry, attribute: str) -> bytes | None:
        for name, values in entry.attributes:
            if _text(name).lower() == attribute.lower() and values:
                value = values[0]
                return value if isinstance(value, bytes) else str(value).encode("latin-1")
        return None

    @staticmethod
    def _value(entry: pureldap.LDAPSearchResultEntry, attribute: str) -> str | None:
        for name, values in entry.attributes:
            if _text(name).lower() == attribute.lower() and values:
                value = values[0]
                return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        return None

    def _under_user_base(self, name: str) -> bool:
        if not looks_like_dn(name):
            return False
        return normalise_dn(name).endswith("," + normalise_dn(self.config.user_base))

    def _account(self, entry: pureldap.LDAPSearchResultEntry, active: bool,
                 domain: Domain | None = None,
                 token_groups: set[bytes] | None = None) -> Account | None:
        dn = _text(entry.objectName)
        values: dict[str, list[bytes]] = {}
        for name, vals in entry.attributes:
            values[_text(name).lower()] = [v if isinstance(v, bytes) else str(v).encode() for v in vals]

        def first(attribute: str | None) -> bytes | None:
            if not attribute:
                return None
            found = values.get(attribute.lower())
            return found[0] if found else None

        username = first(self.config.username_attribute)
        if username is None:
            log.warn("{dn} has no {attribute}", dn=dn, attribute=self.config.username_attribute)
            return None
        groups = frozenset(
            normalise_dn(v.decode("utf-8", "replace"))
            for v in values.get(self.config.member_of_attribute.lower(), [])
        )
        reason = None if active else "inactive"
        if domain is not None:
            # Nested groups and the primary group: memberOf lists neither.
            groups |= {dn for sid, dn in domain.group_sids.items() if sid in (token_groups or ())}
            if active:
                reason = ad_inactive_reason(first, self._reactor.seconds(), domain)
                active = reason is None
        changed = first(self.config.password_changed_attribute)
        return Account(
            dn=dn,
            username=canonical_username(username.decode("utf-8", "replace")),
            active=active,
            inactive_reason=reason,
            groups=groups,
            mfa_enforced=self._groups["mfa"] in groups,
            modern_auth_only=self._groups["modern"] in groups,
            admin=self._groups["admin"] in groups,
            password_changed_at=parse_password_changed(changed) if changed else None,
            mail=mail.decode("utf-8", "replace") if (mail := first(self.config.mail_attribute)) else None,
        )

    async def check_password(self, dn: str, password: str) -> bool:
        """Bind as ``dn``. True: accepted; False: refused. Raises
        :class:`DirectoryUnavailable`. Never call it with an empty password:
        that is an unauthenticated bind, which succeeds (RFC 4513 5.1.2)."""
        if not password:
            return False

        async def operation(client: LDAPClient) -> bool:
            try:
                await client.bind(dn, password.encode("utf-8", "surrogateescape"))
            except ldaperrors.LDAPInvalidCredentials:
                return False
            except ldaperrors.LDAPException as e:
                # 48 inappropriateAuthentication, 53 unwillingToPerform (for
                # example an account locked by ppolicy): a refusal too.
                if getattr(e, "resultCode", None) in (48, 50, 53):
                    return False
                raise
            return True

        try:
            return await self._run(self._bind, operation)
        except ldaperrors.LDAPException as e:
            log.warn("directory bind failed: {error}", error=type(e).__name__)
            raise DirectoryUnavailable("bind failed") from None
