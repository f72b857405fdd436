"""Reading an API request: its address, its JSON body, its query and the
fields of an app password to make, each checked, a problem (RFC 9457) for
anything wrong. No I/O but the request object's own."""

from __future__ import annotations

import json
import math
from typing import Any

from proxy.api import problems, views
from proxy.config import parse_expiry
from proxy.store import PROTOCOLS

JSON = b"application/json"
PAGE_SIZE, PAGE_SIZE_MAX = 100, 500
LONGEST_EXPIRY = 100 * 365 * 86400.0



def address(request: Any) -> str:
    return getattr(request.getClientAddress(), "host", None) or "unknown"

def body(request: Any) -> dict[str, Any]:
    kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if kind != JSON:
        raise problems.UnsupportedMediaType("send the body as application/json")
    try:
        body = json.loads(request.content.read() or b"null")
    except (ValueError, UnicodeDecodeError):
        raise problems.BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise problems.BadRequest("the body must be a JSON object")
    return body

def query(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise problems.BadRequest(f"{name} is not UTF-8") from None

def filters(request: Any) -> dict[str, Any]:
    """The listing's query: its page and filters, checked."""
    found: dict[str, Any] = {}
    size = query(request, "page_size")
    try:
        found["limit"] = PAGE_SIZE if size is None else int(size)
    except ValueError:
        raise problems.BadRequest("page_size is a whole number") from None
    if not 1 <= found["limit"] <= PAGE_SIZE_MAX:
        raise problems.BadRequest(f"page_size is 1 to {PAGE_SIZE_MAX}")
    page = query(request, "page_token")
    found["after"] = None
    if page is not None:
        found["after"] = views.after_of(page)
        if found["after"] is None:
            raise problems.BadRequest("page_token is not one this API gave")
    stopped = query(request, "stopped")
    if stopped is not None:
        if stopped not in ("true", "false"):
            raise problems.BadRequest("stopped is true or false")
        found["stopped"] = stopped == "true"
    for name in ("protocol", "last_used_protocol"):
        value = query(request, name)
        if value is not None:
            if value not in PROTOCOLS:
                raise problems.BadRequest(f"{name} is one of {', '.join(PROTOCOLS)}")
            found[name] = value
    days = query(request, "unused_days")
    if days is not None:
        try:
            number = int(days)
        except ValueError:
            raise problems.BadRequest("unused_days is a whole number of days") from None
        if not 0 <= number <= 36500:
            raise problems.BadRequest("unused_days is 0 to 36500")
        found["unused_for"] = number * 86400.0
    return found


def wanted(body: dict[str, Any], now: float) -> dict[str, Any]:
    unknown = set(body) - {"name", "expires", "protocols", "networks"}
    if unknown:
        raise problems.BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    name = body.get("name")
    if not isinstance(name, str):
        raise problems.BadRequest("name (the device's) is needed, as a string")
    expires, expires_at = body.get("expires"), None
    if expires is not None:
        if not isinstance(expires, str):
            raise problems.BadRequest("expires is a duration (90d, 12h) or a date")
        try:
            expires_at = parse_expiry(expires, now)
        except (ValueError, OverflowError) as e:
            raise problems.BadRequest(f"expires: {e}") from None
        if not math.isfinite(expires_at) or expires_at - now > LONGEST_EXPIRY:
            raise problems.BadRequest("expires is at most 100 years away")
    protocols = body.get("protocols")
    if protocols is not None:
        if not isinstance(protocols, list) or not all(isinstance(p, str) for p in protocols):
            raise problems.BadRequest("protocols is a list of protocol names")
        protocols = frozenset(protocols)
    networks = body.get("networks")
    if networks is not None:
        if not isinstance(networks, list) or not all(isinstance(n, str) for n in networks):
            raise problems.BadRequest("networks is a list of networks in CIDR form")
        networks = tuple(networks)
    return {"name": name, "expires_at": expires_at, "protocols": protocols,
            "networks": networks}
