"""The Authenticator: the only place that decides whether a sign-in is accepted.

Order of work, cheapest first, so that an attacker's guesses cost little:

1. shape of the request (empty secret, control characters in the name);
2. legacy authentication blocked for everyone;
3. the account, from the account cache or the directory (one search);
4. inactive account, modern-authentication-only group, account lockout;
5. the secret counted before it is checked (the throttle's reservation);
6. on cloud listeners, app passwords: one HMAC and one index lookup, then at
   most one argon2id verify in the bounded hashing pool (none on a cache hit);
7. primary passwords: refused for MFA-enforced users on cloud listeners,
   otherwise one bind on the directory's bind pool.

The rules themselves are pure functions (:mod:`proxy.auth.rules`) that the
slow path (:meth:`Authenticator.authenticate`) and the fast path
(:meth:`Authenticator.decide_cached`) both call. The Authenticator gathers
the facts and keeps the books: accounts (:mod:`proxy.auth.accounts`), app
passwords (:mod:`proxy.auth.apps`, decided by :mod:`proxy.auth.appsignin`),
access tokens (:mod:`proxy.auth.bearersignin`), the throttle and its
lockouts (:mod:`proxy.auth.lockouts`), revocations, the change feed, the
fleet's shared counts, last uses, and every decision's audit event.

Every refusal is answered no sooner than the source's failure delay after
the attempt began, and one that no directory check decided no sooner than a
check would have ended (:mod:`proxy.auth.timing`): unknown accounts and
wrong secrets look alike.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import attrs
from twisted.logger import Logger

from proxy import apppasswords
from proxy.auth import NOT_GUESSES, Attempt, Decision, Outcome, Reason, rules
from proxy.auth.accounts import Accounts, DirectoryLike
from proxy.auth.apps import AppPasswords
from proxy.auth.appsignin import AppPasswordSignIn
from proxy.auth.bearer import BearerTokens
from proxy.auth.bearersignin import BearerSignIn
from proxy.auth.events import DecisionEvents
from proxy.auth.feed import ChangeFeed
from proxy.auth.fleet import Fleet, SharedCheck
from proxy.auth.lockouts import Lockouts
from proxy.auth.primary import PrimaryPasswords
from proxy.auth.revocations import Listener, Revocations
from proxy.auth.throttle import Throttle
from proxy.auth.timing import CheckTime, FailureDelay
from proxy.auth.usage import UsageRecorder
from proxy.config import CacheConfig, DirectoryConfig, PolicyConfig, ThrottleConfig
from proxy.directory import Account, DirectoryUnavailable
from proxy.store import Change, ChangeKind, MfaState, StoreError
from proxy.threads import Pool

log = Logger(namespace="legacy_auth_proxy.auth")

__all__ = ["Authenticator", "DirectoryLike"]


def _phantom(typed: str) -> Account:
    """The stand-in for a name that matches no account, or an account refused
    whatever the secret: no DN (so nothing is ever checked for it, and nothing
    accepted), counted under its own key, and a store name no account has (a
    canonical name never begins with a space): its look-ups and what they
    remember (a missing app password, the user's state) are its own, never a
    real account's by that name."""
    return Account(dn="", username=" " + typed, active=True, key="unknown:" + typed)


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
        sessions: Any = None,
    ) -> None:
        self._clock = clock
        self.policy = policy
        self.max_sessions = max_sessions
        # The live sessions (proxy.sessions.Registry), to count a device's.
        self.sessions = sessions
        self._directory_config = directory_config
        self._directory = directory
        self._store = store
        self._record = record
        self.events = DecisionEvents(record, metrics)
        self.accounts = Accounts(clock, directory, store, directory_config)
        self.apps = AppPasswords(clock, store, hash_pool, hasher, pepper, cache, metrics)
        self._fleet: Fleet | None = None
        if shared_failures:
            # Failures are counted in the store too, by every process that
            # shares it: a wrong secret must digest alike on each of them.
            self.throttle = Throttle(throttle, clock.seconds, digest_key=hmac.digest(
                pepper, b"legacy-auth-proxy: digests of wrong secrets", hashlib.sha256))
            self._fleet = Fleet(clock, store, self.throttle, throttle, self.accounts.username_of)
        else:
            self.throttle = Throttle(throttle, clock.seconds)
        self.lockouts = Lockouts(self.throttle, self.accounts, self._fleet)
        self._check_time = CheckTime()
        self.primary = PrimaryPasswords(clock, directory, self.throttle, cache,
                                        self._check_time, metrics)
        self.usage = UsageRecorder(clock, store, cache.last_used_interval)
        self._delay = FailureDelay(clock, self.throttle, self._check_time)
        self.revocations = Revocations(clock, store, record)
        self.revocations.on_revoked(self._forget)  # the core's own caches first
        self.feed = ChangeFeed(clock, store, self.apply)
        self.app_sign_in = AppPasswordSignIn(clock, self.apps, self.revocations, self.usage)
        self.bearer_sign_in = BearerSignIn(self.accounts, self.lockouts)

    @property
    def metrics(self) -> Any:
        return self.events.metrics

    @metrics.setter
    def metrics(self, metrics: Any) -> None:
        self.events.metrics = self.apps.metrics = self.primary.metrics = metrics

    @property
    def store_ok_at(self) -> float | None:
        return self.feed.ok_at

    @property
    def revision(self) -> int:
        return self.revocations.revision

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, poll_interval: float = 1.0) -> None:
        # Lockouts read after the feed's end: an unlock between them is in the feed.
        await self.feed.start(poll_interval,
                              self._fleet.start if self._fleet is not None else None)
        self.usage.start()

    async def stop(self) -> None:
        self.feed.stop()
        await self.usage.stop()

    def poll_every(self, interval: float) -> None:
        self.feed.every(interval)

    async def poll_changes(self) -> None:
        """Apply the store's change feed now."""
        await self.feed.poll()

    # -- changes made elsewhere, and revocations ------------------------------------

    def apply(self, change: Change) -> None:
        kind = ChangeKind(change.kind)
        if kind is ChangeKind.UNLOCKED:
            self.unlock(change.username)
            log.info("lockouts of {user} lifted by the help desk", user=change.username)
        elif kind is ChangeKind.LOCKED:
            self.lockouts.locked_elsewhere(change.username)
        elif kind in (ChangeKind.DELETED, ChangeKind.STOPPED) and change.app_password_id:
            self.revocations.revoked(change.username, change.app_password_id, ChangeKind.DELETED)
        else:
            self.revocations.revoked(change.username, None, kind)

    def on_revoked(self, listener: Listener) -> None:
        """Call ``listener(username, app_password_id or None, kind)`` when
        what a session was opened with stops being valid
        (:meth:`proxy.auth.revocations.Revocations.on_revoked`)."""
        self.revocations.on_revoked(listener)

    def revoked_since(self, decision: Decision) -> bool:
        return self.revocations.since(decision)

    def revoke_everyone(self) -> None:
        """Every decision made until now stops counting (legacy
        authentication blocked): sign-ins under way are refused."""
        self.revocations.revoke_everyone()
        self.apps.forget()
        self.primary.forget()
        self.accounts.user_changed()

    def _forget(self, username: str, id: str | None, kind: ChangeKind) -> None:
        self.accounts.user_changed(username)
        if id is not None:
            self.apps.forget(id=id)
            self.usage.forget(id)
        else:
            self.apps.forget(username=username)
            self.primary.forget(username)

    # The help desk's lockouts (proxy.auth.lockouts), asked of the core.

    def unlock(self, username: str) -> int:
        return self.lockouts.unlock(username)

    def locked_out(self) -> list[tuple[str, float]]:
        return self.lockouts.locked_out()

    def locked(self, account: Account, address: str | None = None) -> float:
        return self.lockouts.locked(account, address)

    async def find_names(self, text: str, limit: int = 20) -> list[str]:
        """User names that contain ``text`` (the help desk's search).
        Raises :class:`DirectoryUnavailable`."""
        return await self._directory.find(text, limit)

    async def account(self, name: str) -> Account | None:
        """The account ``name`` (a user name or DN) stands for, as sign-ins
        see it: cached for ``directory.account_cache``. Raises
        :class:`DirectoryUnavailable`."""
        return await self.accounts.account(name.strip())

    # -- the portal's second factor ----------------------------------------------------

    def second_factor_passed(self, attempt: Attempt, decision: Decision) -> None:
        """The second factor of an ``attempt.second_factor`` sign-in passed
        (or the user has none yet and sets one up now): the sign-in is
        complete. Its place becomes familiar and its failures start over."""
        assert decision.account is not None
        self.throttle.succeeded(decision.account.key, attempt.client_address)
        self.events.told(attempt, decision)

    async def second_factor_failed(self, attempt: Attempt, decision: Decision, code: str,
                                   started: float) -> None:
        """A wrong ``code`` after a right password: counted against the
        account like a wrong secret (only a right code clears it), audited
        as ``wrong_code``, logged for fail2ban, and answered when a refused
        password is: no sooner than the failure delay after ``started``."""
        assert decision.account is not None
        account = decision.account
        self.throttle.failed(account.key, attempt.client_address, "code:" + code)
        refused = Decision(Reason.WRONG_CODE, account.username, account, checked=True)
        self.events.told(attempt, refused)
        await self._delay.hold(attempt, refused, started)

    def backend_failed(self, attempt: Attempt, decision: Decision, *, listener: str,
                       reason: str, detail: str = "") -> None:
        """A front end could not log the accepted user in to its backend."""
        self.events.backend_failed(attempt, decision, listener=listener, reason=reason, detail=detail)

    # -- the decision --------------------------------------------------------------

    async def authenticate(self, attempt: Attempt) -> Decision:
        # A warm sign-in (every fact in memory) is decided at once, with no
        # coroutine below this one: most of a legacy client's logins.
        decision = self.decide_cached(attempt)
        if decision is not None:
            return decision
        started = self._clock.seconds()
        revision = self.revision
        decision = attrs.evolve(await self._decide_safely(attempt), revision=revision)
        if decision.accepted and self.revoked_since(decision):
            # Revoked while it was being decided: decide again, from the store.
            decision = attrs.evolve(await self._decide_safely(attempt), revision=self.revision)
        if decision.accepted and attempt.legacy and self._crowded(decision.username, attempt):
            decision = Decision(Reason.TOO_MANY_SESSIONS, decision.username, decision.account,
                                decision.app_password, decision.revision)
        if decision.accepted and attempt.protocol == "ldap":
            decision = self._reading(decision)
        pending = decision.accepted and attempt.second_factor
        if not pending:
            self.events.audit(attempt, decision)
        if decision.outcome is Outcome.REFUSED and decision.reason not in NOT_GUESSES:
            await self._delay.hold(attempt, decision, started)
        if not pending:
            self.events.told(attempt, decision, self._clock.seconds() - started, audit=False)
        return decision

    def _crowded(self, username: str, attempt: Attempt) -> bool:
        return self.sessions is not None and rules.too_many_sessions(
            self.sessions.count(username, attempt.client_address), self.max_sessions)

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
        reads_as, acting_for = rules.reads(self._directory_config, decision.account,
                                           decision.read_only)
        return attrs.evolve(decision, reads_as=reads_as, acting_for=acting_for)

    def decide_cached(self, attempt: Attempt) -> Decision | None:
        """The decision for a sign-in whose every fact is in memory, at once:
        an app password in the success cache, of an account looked up within
        ``directory.account_cache``, on a cloud listener. No coroutine, no
        Deferred, no thread. The same rules as :meth:`authenticate`; None
        when anything would have to be asked (the store, the directory,
        argon2) or the answer is not a plain yes: :meth:`authenticate` then
        decides. Audited and counted alike."""
        if (not rules.takes_app_passwords(attempt) or attempt.second_factor or attempt.bearer
                or rules.screen(attempt, self.policy) is not None):
            return None
        secret = apppasswords.normalise(attempt.secret)
        account = self.accounts.cached(attempt.username.strip())
        if secret is None or account is None or rules.account_refusal(attempt, account):
            return None
        address = attempt.client_address
        if self._fleet is not None:
            self._fleet.impose(account)
        if not self.throttle.admits(account.key, address, attempt.secret):
            return None  # locked, or as many guesses under way as would lock it
        record = self.apps.cached(account.username, secret)
        if record is None or self._crowded(account.username, attempt):
            return None
        now = self._clock.seconds()
        if rules.app_password_reason(attempt, account, record, now, self.policy) \
                is not Reason.APP_PASSWORD:
            return None
        reads_as, acting_for = (rules.reads(self._directory_config, account, True)
                                if attempt.protocol == "ldap" else (None, None))
        decision = Decision(Reason.APP_PASSWORD, account.username, account, record,
                            self.revision, reads_as, acting_for)
        self.throttle.succeeded(account.key, address)
        self.usage.used(record.id, now, address, attempt.protocol)
        if self.metrics is not None:
            self.metrics.cache("app_password", True)
        self.events.told(attempt, decision)
        return decision

    def anonymous(self, attempt: Attempt) -> Decision:
        """An anonymous LDAP bind: accepted where the listener allows it
        (the session then reads as anonymous, and writes nothing). Audited."""
        if not attempt.anonymous_allowed:
            decision = Decision(Reason.ANONYMOUS_REFUSED, "")
        else:
            decision = Decision(Reason.ANONYMOUS, "", revision=self.revision)
        self.events.told(attempt, decision)
        return decision

    async def _decide(self, attempt: Attempt) -> Decision:
        screened = rules.screen(attempt, self.policy)
        if screened is not None:
            return screened
        if attempt.bearer:
            return await self.bearer_sign_in.decide(attempt)
        name = attempt.username.strip()
        typed = apppasswords.canonical_username(attempt.username)
        app_password_form = apppasswords.normalise(attempt.secret)
        stale = False
        try:
            account, owed = await self.accounts.look_up(name)
        except DirectoryUnavailable:
            # The outage grace is for a directory out of reach, never for one
            # that answers while only the proxy's connections are busy: an
            # account it disabled meanwhile must not sign in on old news.
            remembered = self.accounts.remembered(name)
            if (attempt.realm != "cloud" or app_password_form is None or remembered is None
                    or self._directory.answering()):
                return Decision(Reason.DIRECTORY_UNAVAILABLE, typed)
            account, stale = remembered, True
        if account is None:
            return await self._stood_in(attempt, Decision(Reason.UNKNOWN_USER, typed),
                                        app_password_form, owed)
        refused = rules.account_refusal(attempt, account)
        if refused is not None:
            if refused.reason is Reason.ACCOUNT_INACTIVE:
                self.revocations.revoked(account.username, None, ChangeKind.ACCOUNT_INACTIVE)
            return await self._stood_in(attempt, refused, app_password_form, owed)
        if self._fleet is not None:
            self._fleet.impose(account)
        return await self._checked(attempt, account, app_password_form, stale)

    async def _stood_in(self, attempt: Attempt, refusal: Decision,
                        app_password_form: str | None, owed: float) -> Decision:
        """``refusal`` (no account; one refused whatever the secret) after the
        steps a wrong secret goes, with a stand-in: neither the answer, its time
        (:mod:`proxy.auth.timing`) nor the lockout tells which names exist."""
        typed = apppasswords.canonical_username(attempt.username)
        decided = await self._checked(attempt, _phantom(typed), app_password_form, False)
        if decided.accepted:
            raise AssertionError("a stand-in was accepted")  # authenticate: busy, logged
        locked = decided.reason is Reason.LOCKED_OUT
        if self._fleet is not None and not locked and self.throttle.source(
                attempt.client_address):
            owed += self._check_time.reservation()  # a real account's guess: the store's
        if decided.outcome is Outcome.REFUSED and not locked:
            return attrs.evolve(refusal, owed=owed)
        return attrs.evolve(decided, username=refusal.username, account=refusal.account,
                            owed=owed)

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
        shared: SharedCheck | None = None
        decision: Decision | None = None
        try:
            if self._fleet is not None and account.dn and reservation.account:
                began = self._clock.seconds()
                shared = await self._fleet.checked(account.username, reservation)
                if shared is None:
                    return Decision(Reason.LOCKED_OUT, account.username, account)
                # A store's round trip that a name with no account (no DN)
                # does not make: its refusal waits one as well (timing).
                self._check_time.reserved(self._clock.seconds() - began)
            decision = await self._check(attempt, account, app_password_form, stale,
                                         reservation.order)
            return decision
        finally:
            reservation.release()
            if shared is not None:
                shared.settle(decision)

    async def _check(self, attempt: Attempt, account: Account, app_password_form: str | None,
                     stale: bool, since: int) -> Decision:
        """The secret against the account: an app password, or the primary
        password. ``since``: when the check began, in the throttle's order."""
        key = account.key
        if rules.takes_app_passwords(attempt):
            if app_password_form is not None:
                decided = await self.app_sign_in.decide(attempt, account, app_password_form,
                                                        self.policy)
                if decided is not None:
                    if decided.accepted:
                        self.throttle.succeeded(key, attempt.client_address, since)
                    return decided
            if stale:
                return Decision(Reason.DIRECTORY_UNAVAILABLE, account.username, account)
            user = await self.accounts.user(account.username)
            if rules.mfa_required(account, user.mfa_state is MfaState.ENFORCED):
                # Often the user's right password: counted here, never stored.
                self.throttle.failed(key, attempt.client_address, attempt.secret, share=False)
                return Decision(Reason.MFA_REQUIRED, account.username, account)
        return await self.primary.check(attempt, account, since)

    # -- OAuth access tokens ----------------------------------------------------------

    @property
    def bearer(self) -> BearerTokens | None:
        """The oauth section's token checker (set by the daemon's builder)."""
        return self.bearer_sign_in.tokens

    @bearer.setter
    def bearer(self, tokens: BearerTokens | None) -> None:
        self.bearer_sign_in.tokens = tokens

    def takes_bearer_tokens(self, realm: str) -> bool:
        return self.bearer_sign_in.offered(realm)

    async def password_changed(self, account: Account) -> None:
        """The account's primary password changed: its older app passwords stop."""
        await self.app_sign_in.password_changed(account, self.policy)
