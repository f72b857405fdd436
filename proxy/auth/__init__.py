"""The authentication core: one decision for every protocol.

Front ends parse their protocol, build an :class:`Attempt` and act on the
:class:`Decision` that :class:`proxy.auth.authenticator.Authenticator` gives
back. They decide nothing themselves. A client only ever learns "accepted",
"refused" or "try again later"; the reason is for the audit log.
"""

from __future__ import annotations

import attrs

from proxy.directory import Account
from proxy.moves import Phases
from proxy.store import AppPassword

REALMS = ("cloud", "on-premises")


class Outcome(Phases):
    ACCEPTED = "accepted"
    REFUSED = "refused"
    TEMPORARY_FAILURE = "temporary_failure"


class Reason(Phases):
    # accepted
    APP_PASSWORD = "app_password"
    PRIMARY = "primary"
    ANONYMOUS = "anonymous"  # an LDAP listener that allows anonymous binds
    BEARER_TOKEN = "bearer_token"  # an OAuth access token (XOAUTH2, OAUTHBEARER)
    # refused
    WRONG_SECRET = "wrong_secret"
    UNKNOWN_USER = "unknown_user"
    MFA_REQUIRED = "mfa_required"
    LEGACY_BLOCKED = "legacy_blocked"
    ACCOUNT_INACTIVE = "account_inactive"
    LOCKED_OUT = "locked_out"
    EXPIRED = "expired"
    UNUSED = "unused"  # an app password unused longer than policy.app_password_idle_expiry
    WRONG_CODE = "wrong_code"  # the portal's second factor
    OUT_OF_SCOPE = "out_of_scope"
    REVOKED_BY_PASSWORD_CHANGE = "revoked_by_password_change"
    MALFORMED = "malformed"
    FOREIGN_AUTHZID = "foreign_authzid"
    PLAINTEXT = "plaintext"  # a sign-in on a connection that is not encrypted
    ANONYMOUS_REFUSED = "anonymous_refused"
    INVALID_TOKEN = "invalid_token"  # an access token not good here (signature, issuer, audience, time)
    TOKEN_FOR_ANOTHER_USER = "token_for_another_user"
    # temporary failures
    DIRECTORY_UNAVAILABLE = "directory_unavailable"
    BUSY = "busy"
    TOO_MANY_SESSIONS = "too_many_sessions"  # of this user from this address
    PROVIDER_UNAVAILABLE = "provider_unavailable"  # its keys could not be fetched


_TEMPORARY = {Reason.DIRECTORY_UNAVAILABLE, Reason.BUSY, Reason.TOO_MANY_SESSIONS,
              Reason.PROVIDER_UNAVAILABLE}
_ACCEPTED = {Reason.APP_PASSWORD, Reason.PRIMARY, Reason.ANONYMOUS, Reason.BEARER_TOKEN}
_OUTCOMES = {
    reason: Outcome.ACCEPTED if reason in _ACCEPTED
    else Outcome.TEMPORARY_FAILURE if reason in _TEMPORARY else Outcome.REFUSED
    for reason in Reason
}
# Refusals that say nothing of a guess: not counted for fail2ban, not delayed.
NOT_GUESSES = {Reason.PLAINTEXT, Reason.ANONYMOUS_REFUSED}


@attrs.frozen
class Attempt:
    """What a front end extracted from a client: who, with what, from where."""

    protocol: str  # "imap", "smtp", "ldap"
    realm: str  # "cloud" or "on-premises"
    username: str
    secret: str = attrs.field(repr=False)
    client_address: str
    tls: bool
    authzid: str = ""  # SASL's authorization identity; "" when none was sent
    # The listener's settings the core decides by.
    plaintext_allowed: bool = False
    anonymous_allowed: bool = False
    # A legacy protocol (every listener's): False for the portal, which asks
    # for a second factor itself, so that blocking legacy authentication does
    # not lock users out of the page that tells them so, and where an app
    # password is never accepted (it allows no administrative action).
    legacy: bool = True
    # The sign-in is complete only once a second factor passes (the portal):
    # a right password neither clears the account's failures nor is audited
    # as accepted until Authenticator.second_factor_passed says so.
    second_factor: bool = False
    # The secret is an OAuth access token (SASL XOAUTH2, OAUTHBEARER): modern
    # authentication, checked with the identity provider's keys.
    bearer: bool = False

    def __attrs_post_init__(self) -> None:
        if self.realm not in REALMS:
            raise ValueError(f"realm must be one of {REALMS}")


@attrs.frozen
class Decision:
    reason: Reason
    username: str  # canonical: the account's store name when known, else as typed
    account: Account | None = None
    app_password: AppPassword | None = None
    revision: int = 0  # the Authenticator's revocation count when it decided
    # With whose rights an LDAP session reads the directory: the DN its
    # connection is bound as, and the DN named in RFC 4370's proxied
    # authorization control on each request (None: no control).
    reads_as: str | None = None
    acting_for: str | None = None
    # The directory checked a password for it (an answer that took a real
    # check's time); not part of what is decided.
    checked: bool = attrs.field(default=False, eq=False, repr=False)
    # How much sooner than a real account's its look-up found there is none:
    # a refusal of a name with no account waits that long too (timing).
    owed: float = attrs.field(default=0.0, eq=False, repr=False)

    @property
    def outcome(self) -> Outcome:
        return _OUTCOMES[self.reason]

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPTED

    @property
    def read_only(self) -> bool:
        """App passwords never allow administrative actions; anonymous
        sessions write nothing either."""
        return self.reason in (Reason.APP_PASSWORD, Reason.ANONYMOUS)

    @property
    def administrator(self) -> bool:
        return self.reason is Reason.PRIMARY and self.account is not None and self.account.admin
