"""What the API answers with: records as JSON, page tokens, ETags. No I/O."""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

from proxy.audit import timestamp
from proxy.directory import Account
from proxy.store import AppPassword, User


def at(seconds: float | None) -> str | None:
    """RFC 3339 in UTC, or None."""
    return None if seconds is None else timestamp(seconds)


def app_password(a: AppPassword, now: float, idle: float | None) -> dict[str, Any]:
    stopped = a.stopped(now, idle)
    return {
        "id": a.id,
        "user": a.username,
        "name": a.name,
        "created_at": at(a.created_at),
        "created_by": a.created_by,
        "expires_at": at(a.expires_at),
        "protocols": sorted(a.protocols) if a.protocols is not None else None,
        "networks": list(a.networks) if a.networks is not None else None,
        "last_used_at": at(a.last_used_at),
        "last_used_address": a.last_used_address,
        "last_used_protocol": a.last_used_protocol,
        "use_count": a.use_count,
        "stopped": stopped,
        "stopped_at": at(a.stopped_since(idle)) if stopped else None,
    }


def mfa(user: User, account: Account) -> dict[str, Any]:
    return {
        "state": user.mfa_state.value,
        "registered_at": at(user.mfa_registered_at),
        "enforced_by_group": account.mfa_enforced,
    }


def etag(user: User) -> str:
    """A strong ETag of the user's stored MFA state: what a change of it
    compares (If-Match)."""
    text = f"{user.username}\0{user.mfa_state.value}\0{user.mfa_registered_at!r}"
    return '"' + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32] + '"'


def user(u: User, account: Account, *, second_factor: bool, locked_for: float,
         app_passwords: int) -> dict[str, Any]:
    return {
        "user": account.username,
        "dn": account.dn,
        "active": account.active,
        "mfa": mfa(u, account),
        "second_factor": second_factor,
        "legacy_blocked": account.modern_auth_only,
        "locked_for_seconds": round(locked_for) if locked_for > 0 else 0,
        "app_passwords": app_passwords,
    }



def page_token(after: str) -> str:
    """An opaque page token: the id to go on after, versioned."""
    return base64.urlsafe_b64encode(b"v1:" + after.encode("ascii")).decode("ascii").rstrip("=")


def after_of(page: str) -> str | None:
    """The id a page token goes on after; None if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(page + "=" * (-len(page) % 4))
    except (binascii.Error, ValueError):
        return None
    if not raw.startswith(b"v1:") or len(raw) > 64:
        return None
    after = raw[3:].decode("ascii", "replace")
    return after if after and all(c in "0123456789abcdef" for c in after) else None
