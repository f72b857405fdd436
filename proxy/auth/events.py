"""Every decision as an audit event, a metric, and for refusals of guesses a
line fail2ban can read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from proxy.auth import NOT_GUESSES, Attempt, Decision, Outcome

# fail2ban and the like match this namespace's lines; see docs/configuration.md.
failures_log = Logger(namespace="legacy_auth_proxy.auth.failure")


def one_word(text: str) -> str:
    """What a client typed, as one word that cannot pass for another field
    of a log line: letters, digits and ``._@+-`` as they are, anything else
    (spaces, ``=``, ``%``, control characters) as %XX of its UTF-8 bytes. So
    a user name like ``x rhost=10.9.9.9`` cannot make fail2ban ban someone else."""
    return "".join(
        c if c.isalnum() or c in "._@+-"
        else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in text[:256]
    )


class DecisionEvents:
    def __init__(self, record: Callable[..., None], metrics: Any = None) -> None:
        self._record = record
        self.metrics = metrics

    def told(self, attempt: Attempt, decision: Decision, seconds: float = 0.0,
             audit: bool = True) -> None:
        """Audit ``decision`` and count it (``seconds``: how long it took)."""
        if audit:
            self.audit(attempt, decision)
        if self.metrics is not None:
            self.metrics.sign_in(attempt.protocol, attempt.realm, decision.outcome.value,
                                 decision.reason.value, seconds)

    def audit(self, attempt: Attempt, decision: Decision) -> None:
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
            # Why the directory says the account is not active (Active
            # Directory: disabled, locked, expired, password_must_change).
            **({"account_state": decision.account.inactive_reason}
               if decision.account is not None and decision.account.inactive_reason else {}),
        )
        if decision.outcome is not Outcome.ACCEPTED and decision.reason not in NOT_GUESSES:
            failures_log.info(
                "authentication failure: rhost={rhost} user={user} protocol={protocol} "
                "realm={realm} reason={reason}",
                rhost=attempt.client_address,
                user=one_word(decision.username),
                protocol=attempt.protocol,
                realm=attempt.realm,
                reason=decision.reason.value,
            )

    def backend_failed(self, attempt: Attempt, decision: Decision, *, listener: str,
                       reason: str, detail: str = "") -> None:
        """The sign-in was accepted, but the login to the backend as the
        user did not follow: the client got a temporary failure. ``reason``
        is one of a few words (token_unavailable, backend_refused,
        backend_unreachable); ``detail`` says more (the provider's error
        code, the backend's answer), never a secret."""
        self._record("backend_login", outcome="temporary_failure", reason=reason,
                     detail=detail or None, user=decision.username, protocol=attempt.protocol,
                     realm=attempt.realm, listener=listener, client_address=attempt.client_address)

    def session_refused(self, *, user: str, protocol: str, realm: str, client_address: str,
                        why: str) -> None:
        """A request the session's policy refused after its bind (an
        app-password session writing, comparing a password, ...)."""
        self._record("session_refusal", user=user, protocol=protocol, realm=realm,
                     client_address=client_address, reason=why)
