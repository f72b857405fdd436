"""The Authenticator: the only place that decides whether a sign-in is accepted.

Order of work, cheapest first, so that an attacker's guesses cost little:

1. shape of the request (empty secret, control characters in the name);
2. legacy authentication blocked for everyone;
3. the account, from the account cache or the directory (one search);
4. inactive account, modern-authentication-only group, account lockout;
5. on cloud listeners, app passwords: one HMAC and one index lookup, then at
   most one argon2id verify in the bounded hashing pool (none on a cache hit);
6. primary passwords: refused for MFA-enforced users on cloud listeners,
   otherwise one bind on the directory's bind pool.

Every refusal is answered no sooner than the source's failure delay after
the attempt began, which also hides how much work the refusal took (unknown
accounts and wrong secrets look alike). Every decision is audited.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import attrs

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from proxy import apppasswords
from proxy.auth import NOT_GUESSES, Attempt, Decision, Outcome, Reason
from proxy.auth.cache import SuccessCache
from proxy.auth.throttle import Throttle
from proxy.auth.timing import CheckTime
from proxy.auth.usage import UsageRecorder
from proxy.config import CacheConfig, DirectoryConfig, PolicyConfig, ThrottleConfig
from proxy.directory import Account, DirectoryUnavailable
from proxy.store import AppPassword, Change, MfaState, StoreError
from proxy.threads import Busy, Pool

log = Logger(namespace="legacy_auth_proxy.auth")
# fail2ban and the like match this namespace's lines; see docs/configuration.md.
failures_log = Logger(namespace="legacy_auth_proxy.auth.failure")

MAX_ACCOUNTS = 100_000
MISS_TTL = 60.0
MAX_MISSES = 50_000

_STOPPED = {
    "expired": Reason.EXPIRED,
    "password_change": Reason.REVOKED_BY_PASSWORD_CHANGE,
    "unused": Reason.UNUSED,
}


class DirectoryLike(Protocol):
    async def resolve(self, username: str) -> Account | None: ...

    async def check_password(self, dn: str, password: str) -> bool: ...

    def answering(self) -> bool: ...


def _phantom(typed: str) -> Account:
    """The stand-in for a name that matches no account: no DN (so nothing is
    ever checked for it, and nothing accepted), counted under its own key."""
    return Account(dn="", username=typed, active=True, key="unknown:" + typed)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:256]


def _one_word(text: str) -> str:
    """What a client typed, as one word that cannot pass for another field
    of a log line: letters, digits and ``._@+-`` as they are, anything else
    (spaces, ``=``, ``%``, control characters) as %XX of its UTF-8 bytes. So
    a user name like ``x rhost=10.9.9.9`` cannot make fail2ban ban someone else."""
    return "".join(
        c if c.isalnum() or c in "._@+-" else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in text[:256]
    )


class Authenticator:
    def __init__(
        self,
        *,
        clock: Any,
        policy: PolicyConfig,
        throttle: ThrottleConfig,
        cache: CacheConfig,
        directory_config: DirectoryConfig,
        directory: DirectoryLike,
        store: Any,
        hash_pool: Pool,
        hasher: apppasswords.Hasher,
        pepper: bytes,
        record: Callable[..., None],
        metrics: Any = None,
        max_sessions: int = 1 << 30,
        shared_failures: bool = False,
    ) -> None:
        self._clock = clock
        self.metrics = metrics
        self.max_sessions = max_sessions
        self.sessions: Any = None  # proxy.sessions.Sessions, to count a user's sessions
        self.policy = policy
        self._directory_config = directory_config
        self._directory = directory
        self._store = store
        self._hash_pool = hash_pool
        self._hasher = hasher
        self._pepper = pepper
        self._record = record
        self._throttle_config = throttle
        if shared_failures:
            # Failures are counted in the store too, by every process that
            # shares it: a wrong secret must digest alike on each of them.
            self.throttle = Throttle(throttle, clock.seconds, digest_key=hmac.digest(
                pepper, b"legacy-auth-proxy: digests of wrong secrets", hashlib.sha256))
            self.throttle.on_failure = self._share_failure
        else:
            self.throttle = Throttle(throttle, clock.seconds)
        self._app_cache: SuccessCache[AppPassword] = SuccessCache(
            clock.seconds, cache.app_password_ttl, cache.max_entries
        )
        self._primary_cache: SuccessCache[float] = SuccessCache(
            clock.seconds, cache.primary_password_ttl, cache.max_entries
        )
        self._cache_key = secrets.token_bytes(32)
        # Lookup keys the store had no app password for → until when that is
        # trusted. A device with a deleted app password retries the same
        # secret for ever; a key missing now can only appear if the server
        # generates that very secret (2**-75) or a backup is restored, which
        # the time bounds.
        self._misses: OrderedDict[bytes, float] = OrderedDict()
        self._miss_ttl = min(MISS_TTL, cache.app_password_ttl)
        # store user name → (the user's state in the store, when read); kept
        # as long as accounts are, dropped on every change to the user.
        self._users: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        # name as typed → (account key or None for no account, when looked up)
        self._names: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        # account key → (the account as last seen, when)
        self._known: OrderedDict[str, tuple[Account, float]] = OrderedDict()
        self.usage = UsageRecorder(clock, store, cache.last_used_interval)
        self._check_time = CheckTime()
        self._seq = 0
        self._feed = LoopingCall(self.poll_changes)
        self._feed.clock = clock
        self._listeners: list[Callable[[str, str | None, str], None]] = []
        self.argon2_runs = 0
        # Revocations counted, and the count at each user's latest one: what
        # was decided before a revocation of its user is not trusted after it.
        self.revision = 0
        self._user_revision: OrderedDict[str, int] = OrderedDict()
        self._everyone_revision = 0
        self.store_ok_at: float | None = None  # the change feed last read the store
        self._feed_error: str | None = None  # why the feed cannot be read, while it cannot
        # Lockouts decided by failures counted in the store (by any process),
        # by user; imposed on an account's counters when it next signs in.
        self._fleet_lockouts: OrderedDict[str, dict[bool, float]] = OrderedDict()
        self._unlocks: dict[str, int] = {}  # unlocks seen, by user: a late read loses to one

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, poll_interval: float = 1.0) -> None:
        self._seq = await self._store.last_change()
        if self.throttle.on_failure is not None:
            # Lockouts in force now: what the feed says from here on adds to them.
            for username, lockouts in (await self._store.lockouts(self._clock.seconds())).items():
                self._fleet_lockouts[username] = lockouts
        self.store_ok_at = self._clock.seconds()
        self.usage.start()
        self._feed.start(poll_interval, now=False)

    async def stop(self) -> None:
        if self._feed.running:
            self._feed.stop()
        await self.usage.stop()

    def poll_every(self, interval: float) -> None:
        """Read the change feed every ``interval`` seconds (often while the
        store cannot announce changes, seldom while it can)."""
        if self._feed.running:
            if self._feed.interval == interval:
                return
            self._feed.stop()
        self._feed.start(interval, now=False)

    # -- failures counted by every process sharing the store ----------------------

    def _share_failure(self, key: str, familiar: bool, digest: bytes, now: float) -> None:
        """Count a failure in the store too. Kept there by the user's store
        name, with two bytes of the secret's keyed digest: enough to tell a
        repeat from a new guess among a handful, too little to test
        guesses against (docs/deployment.md). Names that match no account
        are counted by each process alone."""
        known = self._known.get(key)
        if known is None:
            return
        username = known[0].username
        config = self._throttle_config
        d = self._store.add_failure(username, familiar, digest[:2], now,
                                    window=config.failure_window, limit=config.account_failures,
                                    lockout=config.lockout, lockout_max=config.lockout_max)

        def counted(until: float | None) -> None:
            if until is not None:
                self._fleet_lockouts.setdefault(username, {})[familiar] = until
                self.throttle.impose(key, familiar, until)

        def failed(failure: Any) -> None:
            if not failure.check(Busy):
                log.warn("cannot count a failure in the store: {error}",
                         error=failure.getErrorMessage())

        d.addCallbacks(counted, failed)

    async def _locked_elsewhere(self, username: str) -> None:
        unlocks = self._unlocks.get(username, 0)
        try:
            lockouts = await self._store.lockouts(self._clock.seconds(), username)
        except Exception as e:
            log.warn("cannot read the lockouts of {user}: {error}", user=username, error=str(e))
            return
        if self._unlocks.get(username, 0) != unlocks:
            return  # unlocked while this was read
        if username in lockouts:
            self._remember(self._fleet_lockouts, username, lockouts[username])

    def _impose_fleet_lockouts(self, account: Account) -> None:
        lockouts = self._fleet_lockouts.get(account.username)
        if lockouts is None:
            return
        now = self._clock.seconds()
        for familiar, until in lockouts.items():
            if until > now:
                self.throttle.impose(account.key, familiar, until)
        if all(until <= now for until in lockouts.values()):
            del self._fleet_lockouts[account.username]

    def on_revoked(self, listener: Callable[[str, str | None, str], None]) -> None:
        """Call ``listener(username, app_password_id or None, kind)`` when
        what a session was opened with stops being valid. ``kind`` is
        ``deleted`` (one app password), ``revoked_all``, ``password_change``
        (the user's app passwords), ``state_changed`` or ``account_inactive``
        (the user). :class:`proxy.sessions.Sessions` closes the sessions."""
        self._listeners.append(listener)

    # -- changes made elsewhere --------------------------------------------------

    async def poll_changes(self) -> None:
        """Apply the store's change feed: what the command line tool changed."""
        try:
            changes = await self._store.changes_since(self._seq)
        except (StoreError, Busy) as e:
            # An outage the node rides out: said once, and once when it ends
            # (an alert on critical lines must not fire for it).
            if self._feed_error is None:
                log.warn("cannot read the store's change feed: {error}; retrying",
                         error=str(e))
            self._feed_error = str(e)
            return
        except Exception:
            log.failure("cannot read the store's change feed")
            return
        if self._feed_error is not None:
            log.info("the store's change feed is read again")
            self._feed_error = None
        self.store_ok_at = self._clock.seconds()
        for change in changes:
            if change.seq <= self._seq:
                continue  # applied by a poll that overlapped this one
            self._seq = change.seq
            self.apply(change)

    def apply(self, change: Change) -> None:
        if change.kind == "unlocked":
            self.unlock(change.username)
        elif change.kind == "locked":
            # Locked by failures counted in the store, perhaps by another process.
            if self.throttle.on_failure is not None:
                Deferred.fromCoroutine(self._locked_elsewhere(change.username))
        elif change.kind in ("deleted", "stopped") and change.app_password_id:
            self._revoked(change.username, change.app_password_id, "deleted")
        else:
            self._revoked(change.username, None, change.kind)

    def unlock(self, username: str) -> int:
        """Lift every lockout of the account the store calls ``username``
        (the help desk's "lift a lockout"); how many accounts were found."""
        self._unlocks[username] = self._unlocks.get(username, 0) + 1
        self._fleet_lockouts.pop(username, None)
        keys = [key for key, (account, _) in self._known.items() if account.username == username]
        keys.append("unknown:" + username)
        for key in keys:
            self.throttle.forget(key)
        return len(keys) - 1

    def locked(self, account: Account, address: str | None = None) -> float:
        """Seconds the account stays locked (from ``address``, or anywhere: the longest)."""
        return self.throttle.locked_anywhere(account.key) if address is None \
            else self.throttle.locked(account.key, address)

    def second_factor_passed(self, attempt: Attempt, decision: Decision) -> None:
        """The second factor of an ``attempt.second_factor`` sign-in passed
        (or the user has none yet and sets one up now): the sign-in is
        complete. Its place becomes familiar and its failures start over."""
        assert decision.account is not None
        self.throttle.succeeded(decision.account.key, attempt.client_address)
        self._audit(attempt, decision)
        if self.metrics is not None:
            self.metrics.sign_in(attempt.protocol, attempt.realm, decision.outcome.value,
                                 decision.reason.value, 0.0)

    def second_factor_failed(self, attempt: Attempt, decision: Decision, code: str) -> float:
        """A wrong ``code`` after a right password: counted against the
        account like a wrong secret (only a right code clears it), audited
        as ``wrong_code`` and logged for fail2ban. Returns the source's
        failure delay, to be counted from when the attempt began."""
        assert decision.account is not None
        account = decision.account
        self.throttle.failed(account.key, attempt.client_address, "code:" + code)
        self._audit(attempt, Decision(Reason.WRONG_CODE, account.username, account))
        if self.metrics is not None:
            self.metrics.sign_in(attempt.protocol, attempt.realm, Outcome.REFUSED.value,
                                 Reason.WRONG_CODE.value, 0.0)
        return self.throttle.failure_delay(attempt.client_address)

    async def account(self, name: str) -> Account | None:
        """The account ``name`` (a user name or DN) stands for, as sign-ins
        see it: cached for ``directory.account_cache``. Raises
        :class:`DirectoryUnavailable`."""
        return await self._account(name.strip())

    def revoked_since(self, decision: Decision) -> bool:
        """Whether something of the decision's user (or everyone's) was
        revoked after it was made."""
        return (self._user_revision.get(decision.username, 0) > decision.revision
                or self._everyone_revision > decision.revision)

    def revoke_everyone(self) -> None:
        """Every decision made until now stops counting (legacy
        authentication blocked): sign-ins under way are refused."""
        self.revision += 1
        self._everyone_revision = self.revision
        self._app_cache.clear()
        self._primary_cache.clear()
        self._misses.clear()
        self._users.clear()

    def _revoked(self, username: str, id: str | None, kind: str) -> None:
        self.revision += 1
        self._user_revision[username] = self.revision
        self._user_revision.move_to_end(username)
        while len(self._user_revision) > MAX_ACCOUNTS:
            self._user_revision.popitem(last=False)
        self._users.pop(username, None)
        if id is not None:
            self._app_cache.drop_tag(id)
            self.usage.forget(id)
        else:
            self._app_cache.drop_user(username)
            self._primary_cache.drop_user(username)
        for listener in self._listeners:
            try:
                listener(username, id, kind)
            except Exception:
                log.failure("a revocation listener failed")

    # -- the decision --------------------------------------------------------------

    async def authenticate(self, attempt: Attempt) -> Decision:
        started = self._clock.seconds()
        revision = self.revision
        decision = attrs.evolve(await self._decide_safely(attempt), revision=revision)
        if decision.accepted and self.revoked_since(decision):
            # Revoked while it was being decided: decide again, from the store.
            decision = attrs.evolve(await self._decide_safely(attempt), revision=self.revision)
        if (decision.accepted and attempt.legacy and self.sessions is not None
                and self.sessions.count(decision.username, attempt.client_address) >= self.max_sessions):
            # Dovecot's mail_max_userip_connections: one device that opens
            # connection after connection cannot take the backend's.
            decision = Decision(Reason.TOO_MANY_SESSIONS, decision.username, decision.account,
                                decision.app_password, decision.revision)
        if decision.accepted and attempt.protocol == "ldap":
            decision = self._reading(decision)
        pending = decision.accepted and attempt.second_factor
        if not pending:
            self._audit(attempt, decision)
        if decision.outcome is Outcome.REFUSED and decision.reason not in NOT_GUESSES:
            now = self._clock.seconds()
            delay = self.throttle.failure_delay(attempt.client_address)
            hold = self._check_time.hold(decision, now - started)
            if hold > delay:
                await self._check_time.wait(self._clock, started + hold - now)
            elif started + delay > now:
                await deferLater(self._clock, started + delay - now)
        if self.metrics is not None and not pending:
            self.metrics.sign_in(attempt.protocol, attempt.realm, decision.outcome.value,
                                 decision.reason.value, self._clock.seconds() - started)
        return decision

    async def _decide_safely(self, attempt: Attempt) -> Decision:
        """The decision; a store that cannot answer is a temporary failure."""
        try:
            return await self._decide(attempt)
        except StoreError as e:
            log.warn("cannot decide a sign-in: {error}", error=str(e))
        except Exception:
            log.failure("authentication failed unexpectedly")
        return Decision(Reason.BUSY, apppasswords.canonical_username(attempt.username))

    def _reading(self, decision: Decision) -> Decision:
        assert decision.account is not None
        reads_as, acting_for = self._reads(decision.account, decision.read_only)
        return attrs.evolve(decision, reads_as=reads_as, acting_for=acting_for)

    def _reads(self, account: Account, read_only: bool) -> tuple[str | None, str | None]:
        """With whose rights the LDAP session reads the directory: a primary
        password's, the user's own; an app password's, never more than the
        user's (directory.app_password_reads)."""
        config = self._directory_config
        if not read_only:
            return account.dn, None
        if config.app_password_reads == "proxied_authorization":
            return config.bind_dn, account.dn
        return config.search_bind_dn, None

    def decide_cached(self, attempt: Attempt) -> Decision | None:
        """The decision for a sign-in whose every fact is in memory, at once:
        an app password in the success cache, of an account looked up within
        ``directory.account_cache``, on a cloud listener. No coroutine, no
        Deferred, no thread. None when anything would have to be asked (the
        store, the directory, argon2) or the answer is not a plain yes:
        :meth:`authenticate` then decides, by the same rules, so the fast
        answer is never a different one. Audited and counted alike."""
        if (not attempt.legacy or attempt.realm != "cloud" or attempt.authzid
                or attempt.second_factor or (not attempt.tls and not attempt.plaintext_allowed)
                or self.policy.block_legacy_auth):
            return None
        name = attempt.username.strip()
        secret = apppasswords.normalise(attempt.secret)
        if secret is None or not name or len(attempt.username) > 256 \
                or any(c in attempt.username for c in "\x00\r\n"):
            return None
        now = self._clock.seconds()
        named = self._names.get(name)
        if named is None or named[0] is None or now - named[1] >= self._directory_config.account_cache:
            return None
        known = self._known.get(named[0])
        if known is None:
            return None
        account = known[0]
        if not account.active or account.modern_auth_only:
            return None
        key, address = account.key, attempt.client_address
        if self._fleet_lockouts:
            self._impose_fleet_lockouts(account)
        if not self.throttle.admits(key, address, attempt.secret):
            return None  # locked, or as many guesses under way as would lock it
        record = self._app_cache.get(apppasswords.lookup_key(self._pepper, account.username, secret))
        if (record is None or record.stopped(now, self.policy.app_password_idle_expiry) is not None
                or not record.allows(attempt.protocol) or not record.allows_from(address)):
            return None
        changed = account.password_changed_at
        if changed is not None and record.created_at < changed:
            return None
        if self.sessions is not None and \
                self.sessions.count(account.username, address) >= self.max_sessions:
            return None
        reads_as, acting_for = (self._reads(account, True) if attempt.protocol == "ldap"
                                else (None, None))
        decision = Decision(Reason.APP_PASSWORD, account.username, account, record, self.revision,
                            reads_as, acting_for)
        self.throttle.succeeded(key, address)
        self.usage.used(record.id, now, address, attempt.protocol)
        self._audit(attempt, decision)
        if self.metrics is not None:
            self.metrics.cache("app_password", True)
            self.metrics.sign_in(attempt.protocol, attempt.realm, "accepted", "app_password", 0.0)
        return decision

    def anonymous(self, attempt: Attempt) -> Decision:
        """An anonymous LDAP bind: accepted where the listener allows it
        (the session then reads as anonymous, and writes nothing). Audited."""
        if not attempt.anonymous_allowed:
            decision = Decision(Reason.ANONYMOUS_REFUSED, "")
        else:
            decision = Decision(Reason.ANONYMOUS, "", revision=self.revision)
        self._audit(attempt, decision)
        if self.metrics is not None:
            self.metrics.sign_in(attempt.protocol, attempt.realm, decision.outcome.value,
                                 decision.reason.value, 0.0)
        return decision

    async def _decide(self, attempt: Attempt) -> Decision:
        name = attempt.username
        typed = apppasswords.canonical_username(name)
        if not attempt.tls and not attempt.plaintext_allowed:
            # Before anything else: nothing sent in the clear is looked at.
            return Decision(Reason.PLAINTEXT, "")
        if (
            not name.strip()
            or len(name) > 256
            or any(c in name for c in "\x00\r\n")
            or not attempt.secret.strip()
            or len(attempt.secret) > 1024
        ):
            return Decision(Reason.MALFORMED, _printable(typed))
        if attempt.authzid and apppasswords.canonical_username(attempt.authzid) != typed:
            # Acting as someone else is what master users do; clients may not.
            return Decision(Reason.FOREIGN_AUTHZID, typed)
        if self.policy.block_legacy_auth and attempt.legacy:
            return Decision(Reason.LEGACY_BLOCKED, typed)
        app_password_form = apppasswords.normalise(attempt.secret)
        stale = False
        try:
            account = await self._account(name.strip())
        except DirectoryUnavailable:
            # The outage grace is for a directory out of reach, never for one
            # that answers while only the proxy's connections are busy: an
            # account it disabled meanwhile must not sign in on old news.
            remembered = self._remembered(name.strip())
            if (attempt.realm != "cloud" or app_password_form is None or remembered is None
                    or self._directory.answering()):
                return Decision(Reason.DIRECTORY_UNAVAILABLE, typed)
            account, stale = remembered, True
        if account is None:
            # A name that matches no account goes the way a real account's
            # wrong secret goes, step by step (the same look-ups, the same
            # counting), and its answer waits as long as a check would
            # (authenticate): neither the answer, nor its time, nor the
            # lockout tells which names exist.
            decided = await self._checked(attempt, _phantom(typed), app_password_form, False)
            if decided.outcome is Outcome.REFUSED and decided.reason is not Reason.LOCKED_OUT:
                return Decision(Reason.UNKNOWN_USER, typed)
            return attrs.evolve(decided, account=None)
        if not account.active:
            self._revoked(account.username, None, "account_inactive")
            return Decision(Reason.ACCOUNT_INACTIVE, account.username, account)
        if account.modern_auth_only and attempt.legacy:
            return Decision(Reason.LEGACY_BLOCKED, account.username, account)
        if self._fleet_lockouts:
            self._impose_fleet_lockouts(account)
        return await self._checked(attempt, account, app_password_form, stale)

    async def _checked(self, attempt: Attempt, account: Account, app_password_form: str | None,
                       stale: bool) -> Decision:
        key = account.key
        if self.throttle.locked(key, attempt.client_address):
            return Decision(Reason.LOCKED_OUT, account.username, account)
        # The secret is counted before it is checked, whichever check it
        # meets (the app-password store, the directory): with the checks
        # under way, one that could pass the lockout is not made at all.
        reservation = self.throttle.reserve(key, attempt.client_address, attempt.secret)
        if reservation is None:
            return Decision(Reason.LOCKED_OUT, account.username, account)
        shared: tuple[str, bool, bytes] | None = None
        decision: Decision | None = None
        try:
            if self.throttle.on_failure is not None and account.dn and reservation.account:
                # Counted in the shared store too, so that guesses spread over
                # every process sharing it meet one budget.
                shared = (account.username, reservation.familiar, reservation.key[1][:2])
                if not await self._reserve_shared(*shared):
                    shared = None
                    decision = Decision(Reason.LOCKED_OUT, account.username, account)
                    return decision
            decision = await self._check(attempt, account, app_password_form, stale,
                                         reservation.order)
            return decision
        finally:
            reservation.release()
            if shared is not None and (decision is None or decision.reason is not Reason.WRONG_SECRET):
                # Not a wrong secret (a wrong one stays, as the failure).
                self._store.release_failure(*shared).addErrback(
                    lambda f: log.warn("cannot release a check in the store: {error}",
                                       error=f.getErrorMessage()))

    async def _reserve_shared(self, username: str, familiar: bool, digest: bytes) -> bool:
        """The store's part of a reservation: False if, counted with every
        process's failures and checks, the check could pass the lockout. A
        store that cannot answer leaves the budget to this process alone."""
        config = self._throttle_config
        try:
            return await self._store.reserve_failure(
                username, familiar, digest, self._clock.seconds(),
                window=config.failure_window, limit=config.account_failures)
        except (StoreError, Busy):
            return True

    async def _check(self, attempt: Attempt, account: Account, app_password_form: str | None,
                     stale: bool, since: int) -> Decision:
        """The secret against the account: an app password, or the primary
        password. ``since``: when the check began, in the throttle's order."""
        key = account.key
        if attempt.realm == "cloud" and attempt.legacy:
            if app_password_form is not None:
                decided = await self._app_password(attempt, account, app_password_form)
                if decided is not None:
                    if decided.accepted:
                        self.throttle.succeeded(key, attempt.client_address, since)
                    return decided
            if stale:
                return Decision(Reason.DIRECTORY_UNAVAILABLE, account.username, account)
            user = await self._user(account.username)
            if user.mfa_state is MfaState.ENFORCED or account.mfa_enforced:
                # Often the user's right password: counted here, never stored.
                self.throttle.failed(key, attempt.client_address, attempt.secret, share=False)
                return Decision(Reason.MFA_REQUIRED, account.username, account)
        return await self._primary(attempt, account, key, since)

    async def _user(self, username: str) -> Any:
        """The user's state in the store (MFA), kept for ``directory.account_cache``
        and dropped on every change to the user."""
        ttl = self._directory_config.account_cache
        now = self._clock.seconds()
        kept = self._users.get(username)
        if kept is not None and now - kept[1] < ttl:
            return kept[0]
        revision = self.revision
        user = await self._store.get_user(username)
        if ttl > 0 and self.revision == revision:  # nothing changed meanwhile
            self._remember(self._users, username, (user, now))
        return user

    # -- accounts ----------------------------------------------------------------

    async def _account(self, name: str) -> Account | None:
        """The account ``name`` signs in as. What is known about an account
        is kept by the account (its DN), never by the name typed: when one of
        its names finds it locked or gone, every other name knows at once."""
        ttl = self._directory_config.account_cache
        now = self._clock.seconds()
        # Names are kept as typed: two names that fold to one form may still
        # be two accounts in the directory.
        named = self._names.get(name)
        if named is not None and now - named[1] < ttl:
            if named[0] is None:
                return None
            known = self._known.get(named[0])
            if known is not None:
                return known[0]
        account = await self._directory.resolve(name)
        if account is None:
            if named is not None and named[0] is not None:
                self._known.pop(named[0], None)  # deleted: gone under every name
            self._remember(self._names, name, (None, now))
            return None
        self._remember(self._names, name, (account.key, now))
        self._remember(self._known, account.key, (account, now))
        return account

    @staticmethod
    def _remember(table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > MAX_ACCOUNTS:
            table.popitem(last=False)

    def _remembered(self, name: str) -> Account | None:
        """During a directory outage: the account ``name`` last found, if it
        was active when last seen, within the outage grace."""
        named = self._names.get(name)
        known = self._known.get(named[0]) if named is not None and named[0] else None
        grace = self._directory_config.outage_grace
        if known is None or not known[0].active or self._clock.seconds() - known[1] > grace:
            return None
        return known[0]

    # -- app passwords -------------------------------------------------------------

    async def _app_password(self, attempt: Attempt, account: Account, secret: str) -> Decision | None:
        """A decision if ``secret`` is one of the account's app passwords; None if not."""
        key = apppasswords.lookup_key(self._pepper, account.username, secret)
        # A name with no account (no DN) is never accepted, whatever a cache
        # or the store still holds for it: it only pays for the look-up.
        record = self._app_cache.get(key) if account.dn else None
        if self.metrics is not None:
            self.metrics.cache("app_password", record is not None)
        verified_now = False
        revision = self._user_revision.get(account.username, 0)
        if record is None:
            now = self._clock.seconds()
            until = self._misses.get(key)
            if until is not None and now < until:
                return None
            found = await self._store.find_by_lookup_key(key)
            if found is None or found[0].username != account.username or not account.dn:
                # (A name with no account: looked up all the same, never accepted.)
                if self._miss_ttl > 0:
                    self._misses[key] = now + self._miss_ttl
                    self._misses.move_to_end(key)
                    while len(self._misses) > MAX_MISSES:
                        self._misses.popitem(last=False)
                return None
            record, encoded = found
            try:
                verified = await self._hash_pool.submit(self._hasher.verify, encoded, secret)
            except Busy:
                return Decision(Reason.BUSY, account.username, account)
            self.argon2_runs += 1
            if not verified:
                return None
            verified_now = True
            if self._hasher.needs_rehash(encoded):
                self._rehash(record, secret)
        now = self._clock.seconds()
        stopped = record.stopped(now, self.policy.app_password_idle_expiry)
        if stopped is not None:
            self._app_cache.drop_tag(record.id)
            return Decision(_STOPPED[stopped], account.username, account, record)
        if not record.allows(attempt.protocol) or not record.allows_from(attempt.client_address):
            return Decision(Reason.OUT_OF_SCOPE, account.username, account, record)
        changed = account.password_changed_at
        if changed is not None and record.created_at < changed:
            self._app_cache.drop_tag(record.id)
            if self.policy.revoke_app_passwords_on_password_change:
                await self._revoke_older(account, changed)
            return Decision(Reason.REVOKED_BY_PASSWORD_CHANGE, account.username, account, record)
        if verified_now and self._user_revision.get(account.username, 0) == revision:
            # Only if nothing of the user's was revoked during the check.
            self._app_cache.put(
                key, record, user=account.username, tag=record.id, expires_at=record.expires_at
            )
        self.usage.used(record.id, now, attempt.client_address, attempt.protocol)
        return Decision(Reason.APP_PASSWORD, account.username, account, record)

    def _rehash(self, record: AppPassword, secret: str) -> None:
        """Outdated argon2 parameters: store a new hash, in the background."""

        async def rehash() -> None:
            try:
                encoded = await self._hash_pool.submit(self._hasher.hash, secret)
                await self._store.replace_hash(record.id, encoded)
                log.info("re-hashed app password {id} with new parameters", id=record.id)
            except Busy:
                pass  # next time
            except Exception:
                log.failure("cannot re-hash app password {id}", id=record.id)

        Deferred.fromCoroutine(rehash())

    async def password_changed(self, account: Account) -> None:
        """The directory says the account's primary password changed (seen
        by the session registry): its older app passwords stop working now,
        and are deleted if the policy says so."""
        changed = account.password_changed_at
        if changed is None:
            return
        if self.policy.revoke_app_passwords_on_password_change:
            await self._revoke_older(account, changed)
        else:
            self._app_cache.drop_user(account.username)

    async def _revoke_older(self, account: Account, changed: float) -> None:
        stopped = await self._store.stop_created_before(
            account.username, changed, self._clock.seconds()
        )
        for record in stopped:
            self._revoked(account.username, record.id, "password_change")
        if stopped:
            self._record(
                "app_passwords_stopped",
                user=account.username,
                count=len(stopped),
                app_password_ids=[r.id for r in stopped],
                reason="password_change",
                actor="password_change",
            )

    # -- primary passwords -----------------------------------------------------------

    async def _primary(self, attempt: Attempt, account: Account, key: str, since: int) -> Decision:
        cache_key = hmac.digest(
            self._cache_key,
            account.dn.encode() + b"\x00" + attempt.secret.encode("utf-8", "surrogateescape"),
            hashlib.sha256,
        )
        hit = self._primary_cache.get(cache_key) == (account.password_changed_at or 0.0)
        if self.metrics is not None:
            self.metrics.cache("primary", hit)
        if hit:
            if not attempt.second_factor:
                self.throttle.succeeded(key, attempt.client_address, since)
            return Decision(Reason.PRIMARY, account.username, account)
        if self.throttle.recently_failed(key, attempt.client_address, attempt.secret):
            # The same wrong secret again: answered without asking the
            # directory, whose own lockout would otherwise count every retry.
            self.throttle.failed(key, attempt.client_address, attempt.secret)
            return Decision(Reason.WRONG_SECRET, account.username, account)
        if not account.dn:  # a name with no account: nothing to check
            self.throttle.failed(key, attempt.client_address, attempt.secret, upstream=True)
            return Decision(Reason.WRONG_SECRET, account.username, account)
        try:
            accepted = await self._directory.check_password(account.dn, attempt.secret)
        except DirectoryUnavailable:
            return Decision(Reason.DIRECTORY_UNAVAILABLE, account.username, account)
        if not accepted:
            self.throttle.failed(key, attempt.client_address, attempt.secret, upstream=True)
            return Decision(Reason.WRONG_SECRET, account.username, account, checked=True)
        # Kept with the password-change time it was checked at: a change in
        # the directory makes the entry worthless.
        self._primary_cache.put(cache_key, account.password_changed_at or 0.0, user=account.username)
        if not attempt.second_factor:
            self.throttle.succeeded(key, attempt.client_address, since)
        return Decision(Reason.PRIMARY, account.username, account, checked=True)

    # -- audit ---------------------------------------------------------------------

    def _audit(self, attempt: Attempt, decision: Decision) -> None:
        ap = decision.app_password
        self._record(
            "authentication",
            outcome=decision.outcome.value,
            reason=decision.reason.value,
            user=decision.username,
            dn=decision.account.dn if decision.account else None,
            app_password_id=ap.id if ap else None,
            app_password_name=ap.name if ap else None,
            protocol=attempt.protocol,
            realm=attempt.realm,
            client_address=attempt.client_address,
            tls=attempt.tls,
            **({"reads_as": decision.reads_as, "acting_for": decision.acting_for}
               if decision.reads_as else {}),
        )
        if decision.outcome is not Outcome.ACCEPTED and decision.reason not in NOT_GUESSES:
            failures_log.info(
                "authentication failure: rhost={rhost} user={user} protocol={protocol} "
                "realm={realm} reason={reason}",
                rhost=attempt.client_address,
                user=_one_word(decision.username),
                protocol=attempt.protocol,
                realm=attempt.realm,
                reason=decision.reason.value,
            )
