"""The decision on a secret found among the account's app passwords: the
rules (:func:`proxy.auth.rules.app_password`: scope, expiry, an account
whose password changed since), then the books kept for it: the success
cached (:mod:`proxy.auth.apps`) only if nothing of the user's was revoked
during the check, an app password older than the account's password
stopped (:meth:`proxy.auth.revocations.Revocations.stop_older`), the last
use recorded (:mod:`proxy.auth.usage`). The policy is passed with each call:
a reload replaces it.
"""

from __future__ import annotations

from typing import Any

from proxy.auth import Attempt, Decision, Reason, rules
from proxy.auth.apps import BUSY, AppPasswords, Found
from proxy.auth.revocations import Revocations
from proxy.auth.usage import UsageRecorder
from proxy.config import PolicyConfig
from proxy.directory import Account


class AppPasswordSignIn:
    """Decides sign-ins with an app password, and what a password change
    does to the account's app passwords."""

    def __init__(self, clock: Any, apps: AppPasswords, revocations: Revocations,
                 usage: UsageRecorder) -> None:
        self._clock = clock
        self._apps = apps
        self._revocations = revocations
        self._usage = usage

    async def decide(self, attempt: Attempt, account: Account, secret: str,
                     policy: PolicyConfig) -> Decision | None:
        """A decision if ``secret`` is one of the account's app passwords; None if not."""
        revision = self._revocations.of(account.username)
        found = await self._apps.find(account, secret)
        if found is BUSY:
            return Decision(Reason.BUSY, account.username, account)
        if not isinstance(found, Found):
            return None
        record = found.record
        now = self._clock.seconds()
        stopped = record.stopped(now, policy.app_password_idle_expiry) is not None
        decision = rules.app_password(attempt, account, record, now, policy)
        if decision.reason in (Reason.EXPIRED, Reason.UNUSED, Reason.REVOKED_BY_PASSWORD_CHANGE):
            self._apps.forget(id=record.id)
            if not stopped and account.password_changed_at is not None \
                    and policy.revoke_app_passwords_on_password_change:
                # Older than the account's password: stopped now, with the rest.
                await self._revocations.stop_older(account)
        if not decision.accepted:
            return decision
        if found.verified_now and self._revocations.of(account.username) == revision:
            # Only if nothing of the user's was revoked during the check.
            self._apps.remember(account, secret, record)
        self._usage.used(record.id, now, attempt.client_address, attempt.protocol)
        return decision

    async def password_changed(self, account: Account, policy: PolicyConfig) -> None:
        """The directory says the account's primary password changed (seen
        by the session registry): its older app passwords stop working now,
        and are deleted if the policy says so."""
        if account.password_changed_at is None:
            return
        if policy.revoke_app_passwords_on_password_change:
            await self._revocations.stop_older(account)
        else:
            self._apps.forget(username=account.username)
