"""What the portal's pages say in words, with no I/O: a refused sign-in
from the audit log as a row, a user's MFA state as it takes effect, a name
quoted for people (never a program's ``repr``), the end of a chosen day."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any

import attrs

from proxy.directory import Account
from proxy.store import MfaState

REFUSAL_WORDS = {
    "wrong_secret": "wrong password", "wrong_code": "wrong code", "unknown_user": "unknown user",
    # The core checks no primary password for a user who must use app
    # passwords (it would only feed the directory's lockout): what was sent
    # is not one of their app passwords, and that is all that is known.
    "mfa_required": "not one of their app passwords (their usual password, or a mistyped or "
                    "deleted app password): only app passwords work there",
    "legacy_blocked": "legacy sign-in blocked", "account_inactive": "account not active",
    "locked_out": "locked out", "expired": "app password expired", "unused": "app password unused too long",
    "out_of_scope": "app password not allowed there", "revoked_by_password_change":
    "app password older than the password change", "malformed": "malformed request",
    "too_many_sessions": "too many sessions", "directory_unavailable": "directory did not answer",
    "busy": "busy", "plaintext": "sign-in without TLS",
}
PROTOCOL_WORDS = {"imap": "IMAP", "pop3": "POP3", "smtp": "SMTP", "ldap": "LDAP", "portal": "this portal"}
# The longest a UTC offset is: UTC-12 to UTC+14.
MAX_OFFSET_MINUTES = 14 * 60


def quoted(text: str) -> str:
    """A name as a sentence shows it: “Bob's "work" phone”."""
    return f"“{text}”"


@attrs.frozen
class Refusal:
    """One refused sign-in as a page shows it."""

    at: float | None  # POSIX seconds; None: the event's time did not read
    address: str
    protocol: str
    why: str
    app_password: str | None  # the name of the app password tried, when one was recognised


def audit_time(text: Any) -> float | None:
    """An audit event's ``time`` (RFC 3339, ``...Z``) in POSIX seconds."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def refusal(event: dict[str, Any]) -> Refusal:
    reason = str(event.get("reason", ""))
    protocol = str(event.get("protocol", ""))
    name = event.get("app_password_name")
    return Refusal(
        at=audit_time(event.get("time")),
        address=str(event.get("client_address", "")),
        protocol=PROTOCOL_WORDS.get(protocol, protocol),
        why=REFUSAL_WORDS.get(reason, reason),
        app_password=str(name) if name else None,
    )


def needle_of(username: str) -> bytes | None:
    """What every audit line naming ``username`` holds, as bytes: the name
    as JSON writes it (None where JSON or the audit's escaping would write it
    otherwise: then every line is parsed)."""
    if not username.isprintable() or '"' in username or "\\" in username:
        return None
    return f'"{username}"'.encode()


def is_refusal_of(username: str) -> Any:
    """The audit events that are refused sign-ins of ``username``."""

    def wanted(event: dict[str, Any]) -> bool:
        return (event.get("event") == "authentication" and event.get("user") == username
                and event.get("outcome") not in ("accepted", None))

    return wanted


@attrs.frozen
class MfaInEffect:
    """A user's MFA state as sign-ins apply it: the store's state, unless a
    directory group enforces MFA whatever the store says."""

    effective: str
    stored: str
    by_group: bool

    @property
    def hidden(self) -> bool:
        """The state set here is not the one in effect."""
        return self.by_group and self.stored != MfaState.ENFORCED.value

    @property
    def why(self) -> str:
        """Where the state in effect comes from, when a group has a say."""
        if not self.by_group:
            return ""
        if not self.hidden:
            return "set here, and by a directory group"
        return f"by a directory group; set here: {self.stored}, which applies only if they " \
               f"leave the group"

    @property
    def text(self) -> str:
        return f"{self.effective} ({self.why})" if self.why else self.effective

    @property
    def consequence(self) -> str:
        if self.effective == MfaState.ENFORCED.value:
            return "only app passwords work on cloud listeners"
        return "their usual password still works on cloud listeners"


def mfa_in_effect(account: Account, stored: MfaState) -> MfaInEffect:
    effective = MfaState.ENFORCED.value if account.mfa_enforced else stored.value
    return MfaInEffect(effective, stored.value, account.mfa_enforced)


def end_of_day(day: str, offset_minutes: str | None) -> float:
    """The last second of the date ``day`` (``2027-03-07``) in the zone
    ``offset_minutes`` east of UTC (what the browser said of that day; empty
    or out of range: UTC). Raises ValueError for what is not a date."""
    chosen = date.fromisoformat(day)
    offset = 0
    if offset_minutes:
        try:
            offset = int(offset_minutes)
        except ValueError:
            offset = 0
        if abs(offset) > MAX_OFFSET_MINUTES:
            offset = 0
    midnight = datetime.combine(chosen + timedelta(days=1), datetime.min.time(),
                                tzinfo=timezone(timedelta(minutes=offset)))
    return midnight.timestamp() - 1
