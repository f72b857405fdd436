"""SASL's bearer-token mechanisms, both sides: OAUTHBEARER (RFC 7628) and
Google's and Microsoft's XOAUTH2, as IMAP AUTHENTICATE, SMTP AUTH and POP3
AUTH carry them. Raw messages in and out (the caller base64-encodes); no
I/O, no policy: whether a token is good is the core's question.

The client's message names the user and carries the token:

    OAUTHBEARER  n,a=<user>,^Ahost=<host>^Aport=<port>^Aauth=Bearer <token>^A^A
    XOAUTH2      user=<user>^Aauth=Bearer <token>^A^A

A server that refuses sends a challenge, a JSON object (``status``,
``schemes``, ``scope``); the client answers it with a dummy (``^A`` for
OAUTHBEARER, nothing for XOAUTH2) and gets the protocol's refusal.
"""

from __future__ import annotations

import json
import re

import attrs

MECHANISMS = ("OAUTHBEARER", "XOAUTH2")
_KVSEP = b"\x01"
# What a client sends to end an exchange the server refused (RFC 7628 3.2.3).
DUMMY = {"OAUTHBEARER": b"\x01", "XOAUTH2": b""}
MAX_TOKEN = 16384  # larger than any provider's JWT; a bound for the parser


class Malformed(ValueError):
    """A message that is not the mechanism's; the text is safe to log (it
    never quotes the token)."""


@attrs.frozen
class BearerMessage:
    """What a client's OAUTHBEARER or XOAUTH2 message says."""

    mechanism: str
    user: str  # the authorization identity (OAUTHBEARER's a=, XOAUTH2's user=); may be empty
    token: str = attrs.field(repr=False)
    host: str = ""
    port: int | None = None


def _saslname(name: str) -> bytes:
    """RFC 5801's saslname: ``,`` and ``=`` escaped as ``=2C`` and ``=3D``."""
    return name.replace("=", "=3D").replace(",", "=2C").encode("utf-8")


def _unsaslname(value: bytes) -> str:
    if b"=" in value.replace(b"=2C", b"").replace(b"=3D", b""):
        raise Malformed("a bad escape in the authorization identity")
    return value.replace(b"=2C", b",").replace(b"=3D", b"=").decode("utf-8")


# RFC 6750's b64token: what may follow "Bearer ". Keeps a token from
# carrying ^A or a line end into the message. A regular expression, not a
# loop over the characters: every backend login encodes one.
B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def _token_ok(token: str) -> None:
    if len(token) > MAX_TOKEN or not B64TOKEN.fullmatch(token):
        raise Malformed("the token is not an RFC 6750 bearer token")


def encode(mechanism: str, user: str, token: str, host: str = "", port: int | None = None) -> bytes:
    """The client's first message for ``mechanism``, not yet base64-encoded."""
    _token_ok(token)
    if any(c in user for c in "\x00\x01\r\n"):
        raise Malformed("the user name has a control character")
    if mechanism == "XOAUTH2":
        return b"user=" + user.encode("utf-8") + _KVSEP + b"auth=Bearer " + token.encode() + _KVSEP * 2
    if mechanism != "OAUTHBEARER":
        raise ValueError(f"unsupported mechanism {mechanism!r}")
    pairs = []
    if host:
        pairs.append(b"host=" + host.encode("idna"))
    if port is not None:
        pairs.append(b"port=" + str(port).encode())
    pairs.append(b"auth=Bearer " + token.encode())
    return b"n,a=" + _saslname(user) + b"," + _KVSEP + _KVSEP.join(pairs) + _KVSEP * 2


def decode(mechanism: str, message: bytes) -> BearerMessage:
    """A client's first message for ``mechanism`` (already base64-decoded)."""
    if mechanism == "XOAUTH2":
        fields = _pairs(message)
        user = fields.get("user")
        if user is None:
            raise Malformed("XOAUTH2 without user=")
        return BearerMessage("XOAUTH2", user, _bearer(fields))
    if mechanism != "OAUTHBEARER":
        raise ValueError(f"unsupported mechanism {mechanism!r}")
    header, sep, rest = message.partition(_KVSEP)
    if not sep:
        raise Malformed("OAUTHBEARER without a key-value part")
    parts = header.split(b",")
    # gs2-header: n, y or p (channel binding: not offered here), then a=, then an empty field.
    if len(parts) != 3 or parts[0] not in (b"n", b"y") or parts[2] != b"":
        raise Malformed("OAUTHBEARER's GS2 header is malformed")
    user = ""
    if parts[1]:
        if not parts[1].startswith(b"a="):
            raise Malformed("OAUTHBEARER's GS2 header is malformed")
        try:
            user = _unsaslname(parts[1][2:])
        except UnicodeDecodeError:
            raise Malformed("the authorization identity is not UTF-8") from None
    fields = _pairs(_KVSEP + rest)
    port = fields.get("port")
    if port is not None and not (port.isdigit() and len(port) <= 5):
        raise Malformed("OAUTHBEARER's port is not a number")
    return BearerMessage("OAUTHBEARER", user, _bearer(fields), fields.get("host", ""),
                         int(port) if port is not None else None)


def _pairs(message: bytes) -> dict[str, str]:
    """``key=value`` pairs between ^A, ended by ^A^A (XOAUTH2 starts with a
    key, OAUTHBEARER's part after the header with ^A)."""
    if not message.endswith(_KVSEP * 2) or len(message) > MAX_TOKEN + 4096:
        raise Malformed("the message does not end with ^A^A")
    fields: dict[str, str] = {}
    for item in message[:-2].split(_KVSEP):
        if not item:
            continue
        key, eq, value = item.partition(b"=")
        if not eq or not key.isalpha():
            raise Malformed("a key-value pair is malformed")
        try:
            fields[key.decode("ascii").lower()] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("a value is not UTF-8") from None
    return fields


def _bearer(fields: dict[str, str]) -> str:
    auth = fields.get("auth", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer":
        raise Malformed("no auth=Bearer")
    _token_ok(token)
    return token


def error_challenge(status: str = "invalid_token", scope: str | None = None) -> bytes:
    """A server's refusal (RFC 7628 3.2.2), not yet base64-encoded."""
    body: dict[str, str] = {"status": status, "schemes": "bearer"}
    if scope:
        body["scope"] = scope
    return json.dumps(body, separators=(",", ":")).encode()


def error_status(challenge: bytes) -> str:
    """The ``status`` of a server's refusal (base64-decoded), or "" if it
    is not one; never more than a short word fit for a log."""
    try:
        body = json.loads(challenge)
    except ValueError:
        return ""
    status = body.get("status") if isinstance(body, dict) else None
    if not isinstance(status, str):
        return ""
    return "".join(c for c in status[:40] if c.isascii() and (c.isalnum() or c in "_-."))
