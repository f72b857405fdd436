"""The portal's page sessions: who is signed in to the web pages, in memory.

A session is named by a random 256-bit token in a ``__Host-`` cookie
(``Secure; HttpOnly; SameSite=Strict; Path=/``) and kept here, never in the
store: a restart signs everyone out of the portal, which costs a user one
sign-in. Each session ends after ``portal.session_idle`` without a request
and ``portal.session_max`` after sign-in, whichever comes first, and holds a
CSRF token that every form carries back.

A session goes through stages: ``enrolling`` (the password was right, the
user has no authenticator yet: the key being set up is held here, never
stored until a code confirms it) and ``signed_in``. A new token is issued
at each stage, so a token seen before sign-in is worth nothing after it.

A session also holds when its user last proved who they are with a second
factor (``strong_at``: the TOTP code's time, or the provider's
``auth_time``): :func:`fresh` is the one rule the actions that need a
recent proof (making an app password, every help-desk action) are held to.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from typing import Any

import attrs

COOKIE = "__Host-portal-session"
CSRF_COOKIE = "__Host-portal-csrf"  # the sign-in form's, before any session exists
MAX_SESSIONS = 10_000
PER_USER = 20  # one user's page sessions; their oldest go first
ENROLLING = 600.0  # the longest a half-signed-in enrolment may take


def same(a: str, b: str) -> bool:
    """Compare two tokens in constant time."""
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


@attrs.define
class WebSession:
    username: str
    dn: str
    stage: str  # "enrolling", "passkey" (the password was right; a passkey next) or "signed_in"
    started: float
    seen: float
    csrf: str = attrs.field(factory=lambda: secrets.token_urlsafe(32), repr=False)
    # What the user's list of their sessions names it by (to end it from
    # another browser): random, neither its token nor what it is kept by.
    id: str = attrs.field(factory=lambda: secrets.token_urlsafe(16))
    pending_key: str | None = attrs.field(default=None, repr=False)  # TOTP key being enrolled
    notice: str | None = None  # one message for the next page ("Deleted ...")
    admin: bool = False  # in directory.admin_group, as of the last request
    method: str = "totp"  # how the user signed in: "totp", "passkey" or "oidc"
    strong_at: float | None = None  # the last proof of who they are: a code, a provider sign-in
    address: str = ""  # where its last request came from (the user's list of their sessions)
    agent: str = ""  # the browser's User-Agent at that request, cut short
    # A new app password to show on the next page, once (the form's answer
    # is a redirect, so a reload never posts it again); popped when shown.
    shown: Any = attrs.field(default=None, repr=False)
    # A passkey ceremony under way (proxy.portal.passkeys): its challenge,
    # and at sign-in the attempt the password began.
    ceremony: Any = attrs.field(default=None, repr=False)


def fresh(session: WebSession, now: float, max_age: float) -> bool:
    """Whether the session's user proved who they are no more than
    ``max_age`` seconds ago (``portal.fresh_check``), whatever the
    session's own age."""
    return session.strong_at is not None and 0 <= now - session.strong_at <= max_age


class WebSessions:
    def __init__(self, clock: Any, idle: float, lifetime: float) -> None:
        self._clock = clock
        self.idle = idle
        self.lifetime = lifetime
        # Kept by a digest of the token: what is in memory does not open a session.
        self._sessions: OrderedDict[bytes, WebSession] = OrderedDict()

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "replace")).digest()

    def __len__(self) -> int:
        return len(self._sessions)

    def start(self, username: str, dn: str, stage: str, pending_key: str | None = None,
              started: float | None = None, *, method: str = "totp",
              strong_at: float | None = None) -> tuple[str, WebSession]:
        """A new session and its token (for the cookie). ``strong_at``: when
        its user last proved who they are (a signed-in stage's default: now)."""
        now = self._clock.seconds()
        token = secrets.token_urlsafe(32)
        if strong_at is None and stage == "signed_in":
            strong_at = now
        session = WebSession(username, dn, stage, started if started is not None else now, now,
                             pending_key=pending_key, method=method, strong_at=strong_at)
        # One enrolment at a time per user, and a bounded number of sessions
        # each: one password cannot push everyone else's sessions out.
        mine = [k for k, s in self._sessions.items() if s.username == username]
        if stage == "enrolling":
            for key in [k for k in mine if self._sessions[k].stage == "enrolling"]:
                del self._sessions[key]
                mine.remove(key)
        for key in mine[: max(0, len(mine) - PER_USER + 1)]:
            del self._sessions[key]
        self._sessions[self._key(token)] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return token, session

    def _expired(self, session: WebSession, now: float) -> bool:
        # Half signed in (an authenticator being set up, a passkey to come): briefly.
        lifetime = self.lifetime if session.stage == "signed_in" else min(self.lifetime, ENROLLING)
        return now - session.seen >= self.idle or now - session.started >= lifetime

    def get(self, token: str | None) -> WebSession | None:
        """The live session a cookie names; an expired one is ended."""
        if not token:
            return None
        key = self._key(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock.seconds()
        if self._expired(session, now):
            del self._sessions[key]
            return None
        session.seen = now
        self._sessions.move_to_end(key)
        return session

    def key_of(self, token: str | None) -> bytes | None:
        """What names a live session without being its token (kept while
        its user is at the provider)."""
        return self._key(token) if token and self.get(token) is not None else None

    def proved(self, key: bytes | None, username: str, at: float) -> WebSession | None:
        """The live signed-in session ``key`` names, if it is ``username``'s,
        marked as proved at ``at`` (a fresh check passed); else None."""
        session = self._sessions.get(key) if key else None
        if session is None or session.username != username or session.stage != "signed_in" \
                or self._expired(session, self._clock.seconds()):
            return None
        session.strong_at = max(session.strong_at or 0.0, at)
        return session

    def end(self, token: str | None) -> None:
        if token:
            self._sessions.pop(self._key(token), None)

    def end_user(self, username: str, stage: str | None = None) -> int:
        """End every portal session of ``username`` (account disabled,
        password changed, authenticator reset), or those at ``stage``."""
        keys = [k for k, s in self._sessions.items()
                if s.username == username and (stage is None or s.stage == stage)]
        for key in keys:
            del self._sessions[key]
        return len(keys)

    def end_one(self, username: str, id: str) -> WebSession | None:
        """End the live session of ``username`` that ``id`` names ("sign
        out that other browser"), at once; None if there is none (gone
        already, or someone else's)."""
        now = self._clock.seconds()
        for key, session in self._sessions.items():
            if session.username == username and same(session.id, id):
                del self._sessions[key]
                return None if self._expired(session, now) else session
        return None

    def of_user(self, username: str) -> list[WebSession]:
        """The live sessions of ``username``, the latest seen first."""
        now = self._clock.seconds()
        return sorted((s for s in self._sessions.values()
                       if s.username == username and not self._expired(s, now)),
                      key=lambda s: -s.seen)

    def expire(self) -> None:
        now = self._clock.seconds()
        for key, session in list(self._sessions.items()):
            if self._expired(session, now):
                del self._sessions[key]
