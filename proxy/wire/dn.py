"""Distinguished names compared as the directory compares them: a codec
both the directory client and the LDAP front end use, so neither imports
the other for it."""

from __future__ import annotations

from ldaptor.protocols.ldap.distinguishedname import DistinguishedName


def normalise_dn(dn: str) -> str:
    """A comparable form of a DN: ldaptor's parsing, then lowercase."""
    try:
        return DistinguishedName(dn).getText().lower()
    except Exception:
        return dn.strip().lower()
