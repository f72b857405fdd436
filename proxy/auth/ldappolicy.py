"""What an LDAP session may do after its bind: the core's rule, applied by
the front end to each request and each answer, every refusal audited.

A session opened with an app password is read-only, and reads with its
user's rights, never the proxy's (``directory.app_password_reads``): its
requests carry RFC 4370's proxied authorization naming the user, or go
upstream bound as a search account with no more rights than a user (Active
Directory, which has no proxied authorization). Either way it never sees a
secret attribute (:data:`SECRET_ATTRIBUTES`: an app password must not lead to
the primary password, not even to a hash to crack offline), never compares
or searches by one (either is a password check past the throttle), never the
reading account's own entry, is never pointed at the directory behind the
proxy (:func:`readable`), and it may not send proxied authorization of its
own (it would act with the reading account's right to act for others) nor
controls that read more than entries do. Anonymous sessions write nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import attrs

from proxy.auth import Decision
from proxy.wire import ber

# Attributes that hold a password, its hash, or a key or secret that stands
# for one: the one list, kept out of every entry such a session reads, out
# of the attribute lists it asks for (under "*" and "+" too: entries are
# filtered whatever was asked), and never searched or compared on (a filter
# is a password check past the throttle too). Lower case, as
# ``ber.attribute_type`` compares; OIDs beside names, since a request may
# name an attribute either way (a DC answers with the name).
SECRET_ATTRIBUTES = frozenset({
    # OpenLDAP, Samba's and Kerberos's schemas
    b"userpassword", b"authpassword", b"sambantpassword", b"sambalmpassword",
    b"ntpassword", b"lmpassword", b"krbprincipalkey",
    b"2.5.4.35", b"1.3.6.1.4.1.4203.1.3.4", b"1.3.6.1.4.1.7165.2.1.25",
    b"1.3.6.1.4.1.7165.2.1.24", b"2.16.840.1.113719.1.301.4.2.1",
    # Active Directory: password hashes and their history (the DC never
    # returns these over LDAP; named in case a DC or a proxy in front of it does)
    b"unicodepwd", b"supplementalcredentials", b"dbcspwd", b"lmpwdhistory", b"ntpwdhistory",
    b"1.2.840.113556.1.4.90", b"1.2.840.113556.1.4.125", b"1.2.840.113556.1.4.55",
    b"1.2.840.113556.1.4.160", b"1.2.840.113556.1.4.94",
    # Active Directory: readable password attributes (userPassword above is
    # readable in AD and Samba unless dSHeuristics says otherwise;
    # unixUserPassword and msSFU30Password of Services for Unix)
    b"unixuserpassword", b"mssfu30password", b"1.2.840.113556.1.4.1910",
    # Active Directory: managed service accounts' passwords, key trust
    # (Windows Hello, shadow credentials), LAPS (legacy and Windows LAPS),
    # BitLocker and TPM recovery secrets, credential roaming, trusts' and
    # LSA secrets
    b"msds-managedpassword", b"msds-keycredentiallink", b"msds-executescriptpassword",
    b"ms-mcs-admpwd", b"mslaps-password", b"mslaps-encryptedpassword",
    b"mslaps-encryptedpasswordhistory", b"mslaps-encrypteddsrmpassword",
    b"mslaps-encrypteddsrmpasswordhistory",
    b"msfve-recoverypassword", b"msfve-keypackage", b"mstpm-ownerinformation",
    b"mstpm-ownerinformationtemp", b"mspkiaccountcredentials", b"mspkidpapimasterkeys",
    b"currentvalue", b"priorvalue", b"trustauthincoming", b"trustauthoutgoing",
    b"initialauthincoming", b"initialauthoutgoing", b"peklist",
    b"1.2.840.113556.1.4.2196", b"1.2.840.113556.1.4.2328", b"1.2.840.113556.1.4.1783",
    b"1.2.840.113556.1.4.1964", b"1.2.840.113556.1.4.1999", b"1.2.840.113556.1.4.1966",
    b"1.2.840.113556.1.4.2108", b"1.2.840.113556.1.4.1894", b"1.2.840.113556.1.4.1893",
    b"1.2.840.113556.1.4.27", b"1.2.840.113556.1.4.100", b"1.2.840.113556.1.4.129",
    b"1.2.840.113556.1.4.135", b"1.2.840.113556.1.4.539", b"1.2.840.113556.1.4.540",
    b"1.2.840.113556.1.4.865",
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
FILTER = Refusal(ber.INSUFFICIENT_ACCESS_RIGHTS,
                 "sessions opened with an app password cannot search by password attributes",
                 "password_filter")


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
                and ber.compared_attribute(message) in SECRET_ATTRIBUTES:
            return COMPARE
        frame = message.frame
        if message.op_tag == ber.SEARCH_REQUEST:
            requested, named = ber.searched_attributes(message)
            if b"*" in named or not named.isdisjoint(SECRET_ATTRIBUTES):
                return FILTER  # also an extensible match of any attribute
            kept = [a for a in requested if ber.attribute_type(a) not in SECRET_ATTRIBUTES]
            if len(kept) < len(requested):
                # Nothing left is "every attribute": ask for none instead.
                frame = ber.with_requested_attributes(message, kept or [ber.NO_ATTRIBUTES])
                message = ber.parse_message(frame)
        if self.acting_for is not None:
            return ber.with_control(message, ber.PROXIED_AUTHORIZATION,
                                    b"dn:" + self.acting_for.encode())
        return frame


PRIMARY = SessionPolicy()
ANONYMOUS = SessionPolicy(read_only=True)


def for_decision(decision: Decision) -> SessionPolicy:
    """The policy of a session opened by an accepted bind."""
    if not decision.read_only:
        return PRIMARY
    if decision.account is None:
        return ANONYMOUS
    return _reading_as_user(decision.acting_for)


@functools.lru_cache(maxsize=4096)
def _reading_as_user(acting_for: str | None) -> SessionPolicy:
    # One policy a user, kept (it is frozen): an app password's client
    # binds again and again, and a policy costs more to make than to find.
    return SessionPolicy(read_only=True, reads_as_user=True, acting_for=acting_for)


OUTSIDE = "outside the directory's naming contexts"


def readable(frame: bytes, is_hidden: Callable[[bytes], bool]) -> bytes:
    """What a session reading as its user may see of a message from the
    directory: search results without secret attributes, and nothing
    (b"") of an entry ``is_hidden`` names (the reading accounts' own).

    Nor where the directory points elsewhere: a search result reference
    (Active Directory's to its Configuration, DomainDnsZones and
    ForestDnsZones partitions, from the domain's root) is dropped, and a
    referral (a base outside the DC's partitions) is answered as
    noSuchObject. Each names the DC behind the proxy; a client that followed
    one would go around the proxy, and one that binds again where it is sent
    (JNDI, ldap3's auto_referrals) would offer its app password to the DC,
    feeding its lockout. The partitions are on the same DC: searched by
    their DN, through the proxy, they are read as anything else."""
    try:
        message = ber.parse_message(frame)
        tag = message.op_tag
        if tag == ber.SEARCH_RESULT_ENTRY:
            if is_hidden(ber.entry_name(message)):
                return b""
            return ber.without_attributes(message, SECRET_ATTRIBUTES) or frame
        if tag == ber.SEARCH_RESULT_REFERENCE:
            return b""
        if tag in ber.RESULTS and ber.parse_result_code(message) == ber.REFERRAL:
            return ber.with_result(message, ber.NO_SUCH_OBJECT, OUTSIDE)
        return frame
    except ber.BERError:
        return b""  # nothing unreadable reaches the client
