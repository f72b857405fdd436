"""The rules of a sign-in, once: pure functions of the attempt and the facts
gathered for it, no I/O, no clock of their own.

The Authenticator gathers facts (from memory at once on its fast path, from
the store and the directory on its slow path) and asks these functions at
each step; whatever path it takes, the same facts give the same decision.
Side effects (counting failures, caching successes, revoking) stay with the
Authenticator.
"""

from __future__ import annotations

from proxy import apppasswords
from proxy.auth import Attempt, Decision, Reason
from proxy.config import DirectoryConfig, PolicyConfig
from proxy.directory import Account
from proxy.store import AppPassword
from proxy.wire import oauth

MAX_NAME = 256
MAX_SECRET = 1024
# An OAuth access token: Entra's JWTs run to a few kB (the wire's own bound).
MAX_TOKEN = oauth.MAX_TOKEN

STOPPED = {
    "expired": Reason.EXPIRED,
    "password_change": Reason.REVOKED_BY_PASSWORD_CHANGE,
    "unused": Reason.UNUSED,
}


def printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:MAX_NAME]


def malformed_name(name: str) -> bool:
    return (not name.strip() or len(name) > MAX_NAME
            or "\x00" in name or "\r" in name or "\n" in name)


def screen(attempt: Attempt, policy: PolicyConfig) -> Decision | None:
    """What is refused before anything is looked up: a sign-in sent in the
    clear, a malformed name or secret, another's authorization identity,
    legacy authentication blocked for everyone. None: go on."""
    if not attempt.tls and not attempt.plaintext_allowed:
        # Before anything else: nothing sent in the clear is looked at.
        return Decision(Reason.PLAINTEXT, "")
    # OAUTHBEARER may leave the user out (RFC 7628: the token names it).
    unnamed = attempt.bearer and attempt.username == ""
    if ((malformed_name(attempt.username) and not unnamed) or not attempt.secret.strip()
            or len(attempt.secret) > (MAX_TOKEN if attempt.bearer else MAX_SECRET)):
        return Decision(Reason.MALFORMED,
                        printable(apppasswords.canonical_username(attempt.username)))
    if attempt.authzid and apppasswords.canonical_username(attempt.authzid) \
            != apppasswords.canonical_username(attempt.username):
        # Acting as someone else is what master users do; clients may not.
        return Decision(Reason.FOREIGN_AUTHZID,
                        apppasswords.canonical_username(attempt.username))
    if policy.block_legacy_auth and attempt.legacy and not attempt.bearer:
        return Decision(Reason.LEGACY_BLOCKED, apppasswords.canonical_username(attempt.username))
    return None


def account_refusal(attempt: Attempt, account: Account) -> Decision | None:
    """What refuses an account whatever the secret: inactive in the
    directory, or in the modern-authentication-only group (which an OAuth
    access token is not held by: it is modern authentication)."""
    if not account.active:
        return Decision(Reason.ACCOUNT_INACTIVE, account.username, account)
    if account.modern_auth_only and attempt.legacy and not attempt.bearer:
        return Decision(Reason.LEGACY_BLOCKED, account.username, account)
    return None


def takes_app_passwords(attempt: Attempt) -> bool:
    """App passwords are checked on cloud listeners, for legacy protocols
    (never on the portal, where one would allow an administrative action)."""
    return attempt.realm == "cloud" and attempt.legacy


def app_password_reason(attempt: Attempt, account: Account, record: AppPassword, now: float,
                        policy: PolicyConfig) -> Reason:
    """Why a secret that is ``record`` (its hash verified, or found in the
    success cache) is accepted or refused."""
    stopped = record.stopped(now, policy.app_password_idle_expiry)
    if stopped is not None:
        return STOPPED[stopped]
    if not record.allows(attempt.protocol) or not record.allows_from(attempt.client_address):
        return Reason.OUT_OF_SCOPE
    changed = account.password_changed_at
    if changed is not None and record.created_at < changed:
        return Reason.REVOKED_BY_PASSWORD_CHANGE
    return Reason.APP_PASSWORD


def app_password(attempt: Attempt, account: Account, record: AppPassword, now: float,
                 policy: PolicyConfig) -> Decision:
    """The decision for a secret that is ``record``."""
    return Decision(app_password_reason(attempt, account, record, now, policy),
                    account.username, account, record)


def mfa_required(account: Account, enforced_in_store: bool) -> bool:
    """A primary password where an app password is needed: the user is
    required to use MFA, by the directory's group or the store's state."""
    return enforced_in_store or account.mfa_enforced


def too_many_sessions(open_sessions: int, max_sessions: int) -> bool:
    """Dovecot's mail_max_userip_connections: one device that opens
    connection after connection cannot take the backend's."""
    return open_sessions >= max_sessions


def reads(config: DirectoryConfig, account: Account, read_only: bool) -> tuple[str | None, str | None]:
    """With whose rights an LDAP session reads the directory: the DN its
    connection is bound as, and the DN named in RFC 4370's proxied
    authorization control (None: none). A primary password's, the user's
    own; an app password's, never more than the user's
    (``directory.app_password_reads``)."""
    if not read_only:
        return account.dn, None
    if config.app_password_reads == "proxied_authorization":
        return config.bind_dn, account.dn
    return config.search_bind_dn, None
