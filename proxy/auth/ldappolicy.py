"""What an LDAP session may do after its bind: the core's rule, applied by
the front end to each request and each answer, every refusal audited.

A session opened with an app password is read-only, and reads with its
user's rights, never the proxy's (``directory.app_password_reads``): its
requests carry RFC 4370's proxied authorization naming the user, or go
upstream bound as a search account with no more rights than a user. Either
way it never sees a password attribute (an app password must not lead to the
primary password, not even to a hash to crack offline), never compares one
(a compare is a password check past the throttle), never the reading
account's own entry, and it may not send proxied authorization of its own
(it would act with the reading account's right to act for others) nor
controls that read more than entries do. Anonymous sessions write nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from proxy.auth import Decision
from proxy.wire import ber

# Attributes that hold a primary password or its hash.
PASSWORD_ATTRIBUTES = frozenset({
    b"userpassword", b"authpassword", b"unicodepwd", b"sambantpassword", b"sambalmpassword",
    b"ntpassword", b"lmpassword", b"krbprincipalkey",
    # the same by their OIDs (an attribute may be named either way)
    b"2.5.4.35", b"1.3.6.1.4.1.4203.1.3.4", b"1.2.840.113556.1.4.90",
    b"1.3.6.1.4.1.7165.2.1.25", b"1.3.6.1.4.1.7165.2.1.24", b"2.16.840.1.113719.1.301.4.2.1",
})
# Request controls an app-password session may use: paging, sorting, and
# manageDsaIT. Others may read more than the entries do (dereference, for
# one, returns attributes of other entries inside a control).
APP_PASSWORD_CONTROLS = frozenset({
    "1.2.840.113556.1.4.319",  # simple paged results (RFC 2696)
    "1.2.840.113556.1.4.473",  # server-side sorting (RFC 2891)
    "2.16.840.1.113730.3.4.2",  # manageDsaIT (RFC 3296)
})


@attrs.frozen
class Refusal:
    """A request the session may not make: the answer, and why (audited)."""

    code: int
    text: str
    why: str


READ_ONLY = Refusal(ber.INSUFFICIENT_ACCESS_RIGHTS,
                    "sessions opened with an app password are read-only", "write")
PROXIED = Refusal(ber.AUTHORIZATION_DENIED, "proxied authorization is not allowed",
                  "proxied_authorization")
CONTROL = Refusal(ber.UNAVAILABLE_CRITICAL_EXTENSION,
                  "that control is not available to sessions opened with an app password",
                  "control")
COMPARE = Refusal(ber.INSUFFICIENT_ACCESS_RIGHTS,
                  "sessions opened with an app password cannot check passwords",
                  "password_compare")


@attrs.frozen
class SessionPolicy:
    read_only: bool = False
    reads_as_user: bool = False  # an app password's session: read with its user's rights
    acting_for: str | None = None  # the DN its proxied authorization control names

    def extended(self) -> Refusal | None:
        """An extended operation (other than StartTLS and "Who am I?")."""
        return READ_ONLY if self.read_only else None

    def request(self, message: ber.Message) -> Refusal | bytes:
        """The frame to relay for ``message``, or why it is refused. Raises
        :class:`proxy.wire.ber.BERError` for a malformed request."""
        if message.op_tag in ber.WRITE_REQUESTS and self.read_only:
            return READ_ONLY
        if not self.reads_as_user:
            return message.frame
        controls = ber.control_types(message)
        if ber.PROXIED_AUTHORIZATION in controls or ber.PROXIED_AUTHORIZATION_V1 in controls:
            return PROXIED
        if any(c not in APP_PASSWORD_CONTROLS for c in controls):
            return CONTROL
        if message.op_tag == ber.COMPARE_REQUEST \
                and ber.compared_attribute(message) in PASSWORD_ATTRIBUTES:
            return COMPARE
        if self.acting_for is not None:
            return ber.with_control(message, ber.PROXIED_AUTHORIZATION,
                                    b"dn:" + self.acting_for.encode())
        return message.frame


PRIMARY = SessionPolicy()
ANONYMOUS = SessionPolicy(read_only=True)


def for_decision(decision: Decision) -> SessionPolicy:
    """The policy of a session opened by an accepted bind."""
    if not decision.read_only:
        return PRIMARY
    if decision.account is None:
        return ANONYMOUS
    return SessionPolicy(read_only=True, reads_as_user=True, acting_for=decision.acting_for)


def readable(frame: bytes, is_hidden: Callable[[bytes], bool]) -> bytes:
    """What a session reading as its user may see of a message from the
    directory: search results without password attributes, and nothing
    (b"") of an entry ``is_hidden`` names (the reading accounts' own)."""
    try:
        message = ber.parse_message(frame)
        if message.op_tag != ber.SEARCH_RESULT_ENTRY:
            return frame
        if is_hidden(ber.entry_name(message)):
            return b""
        return ber.without_attributes(message, PASSWORD_ATTRIBUTES) or frame
    except ber.BERError:
        return b""  # nothing unreadable reaches the client
