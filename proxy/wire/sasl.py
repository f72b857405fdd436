"""The server's side of SASL PLAIN (RFC 4616) and LOGIN, and of the
bearer-token mechanisms XOAUTH2 and OAUTHBEARER (RFC 7628, proxy.wire.oauth),
as every mail protocol carries them (IMAP AUTHENTICATE, SMTP AUTH, POP3
AUTH): base64 lines in, a challenge or the credentials out. No I/O, no
policy: whether the authorization identity may differ from the user, and
whether a token is good, are the core's questions.
"""

from __future__ import annotations

import base64
import binascii

import attrs

from proxy.wire import oauth

MECHANISMS = ("PLAIN", "LOGIN")
BEARER_MECHANISMS = oauth.MECHANISMS  # offered where the core takes access tokens
# LOGIN's prompts, as every server sends them: "Username:" and "Password:".
_USERNAME = b"VXNlcm5hbWU6"
_PASSWORD = b"UGFzc3dvcmQ6"


@attrs.frozen
class Challenge:
    """Send this (base64, possibly empty) in the protocol's continuation."""

    data: bytes


@attrs.frozen
class Credentials:
    authcid: bytes
    secret: bytes = attrs.field(repr=False)
    mechanism: str  # "plain", "login", "xoauth2" or "oauthbearer" (the secret is then a token)
    authzid: bytes = b""


@attrs.frozen
class Failed:
    """The exchange is over without credentials: ``kind`` is "cancelled",
    "base64" or "malformed"; ``reason`` says it in words a client may see."""

    kind: str
    reason: str


Step = Challenge | Credentials | Failed


class Exchange:
    """One SASL exchange for ``mechanism`` (one of :data:`MECHANISMS` or
    :data:`BEARER_MECHANISMS`)."""

    def __init__(self, mechanism: str) -> None:
        if mechanism not in MECHANISMS + BEARER_MECHANISMS:
            raise ValueError(f"unsupported mechanism {mechanism!r}")
        self.mechanism = mechanism
        self._answers: list[bytes] = []

    def start(self, initial: bytes | None = None) -> Step:
        """Begin, with the client's initial response if it sent one (SASL-IR;
        ``=`` stands for an empty one)."""
        if initial is None:
            return Challenge(_USERNAME if self.mechanism == "LOGIN" else b"")
        return self._answer(b"" if initial == b"=" else initial)

    def answer(self, line: bytes) -> Step:
        """The client's answer to the last challenge; ``*`` cancels."""
        if line == b"*":
            return Failed("cancelled", "Authentication cancelled.")
        return self._answer(line)

    def _answer(self, line: bytes) -> Step:
        try:
            decoded = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            return Failed("base64", "Invalid base64 data.")
        self._answers.append(decoded)
        if self.mechanism in BEARER_MECHANISMS:
            try:
                message = oauth.decode(self.mechanism, decoded)
            except oauth.Malformed:
                return Failed("malformed", "Invalid OAuth message.")
            return Credentials(message.user.encode("utf-8"), message.token.encode(),
                               self.mechanism.lower())
        if self.mechanism == "LOGIN":
            if len(self._answers) == 1:
                return Challenge(_PASSWORD)
            return Credentials(self._answers[0], self._answers[1], "login")
        parts = decoded.split(b"\x00")
        if len(parts) != 3:
            return Failed("malformed", "Invalid PLAIN message.")
        authzid, authcid, secret = parts
        return Credentials(authcid, secret, "plain", authzid)
