"""The portal's pages: sign-in with a second factor, security info, help desk.

Every page is rendered on the server from Jinja2 templates (autoescaped)
with one CSS file and one small script (the copy button); forms work without
the script. Every answer carries a strict Content-Security-Policy, no
framing, ``Cache-Control: no-store`` and HSTS. Every POST carries the
session's CSRF token (the sign-in form a cookie's, double-submitted) and is
refused from another origin. Nothing secret is put in a URL.

The rules of app passwords are :class:`proxy.admin.Admin`'s, run on the
store's thread; sign-ins are the authentication core's. What a user does is
audited with ``actor: portal:USER``.
"""

from __future__ import annotations

import io
import secrets
import urllib.parse
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import jinja2
import segno
from klein import Klein
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web import http, server

from proxy import apppasswords, secondfactor
from proxy.admin import AdminError
from proxy.audit import minute, recent_events
from proxy.auth import Attempt, Outcome
from proxy.config import Config, parse_expiry
from proxy.directory import Account, DirectoryUnavailable
from proxy.metrics import NoServerHeader
from proxy.portal import notify
from proxy.portal.websessions import COOKIE, CSRF_COOKIE, WebSession, WebSessions, same
from proxy.store import PROTOCOLS, STOPPED_REASONS, AppPassword, LimitReached, MfaState, NameTaken, StoreError
from proxy.threads import Busy
from proxy.transports import AFTER_GOODBYE, hang_up
from proxy.wire.text import printable

log = Logger(namespace="legacy_auth_proxy.portal")

HERE = Path(__file__).parent
MAX_BODY = 64 * 1024
MAX_DRAINED = 1024 * 1024  # past this, an oversized body is answered at once, not read to its end
TOO_LARGE = b"The request is larger than any form here.\n"
CREATIONS_PER_MINUTE = 10
CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    b"Content-Security-Policy": CSP.encode(),
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"same-origin",
    b"Cache-Control": b"no-store",
    b"Strict-Transport-Security": b"max-age=31536000",
    b"Cross-Origin-Opener-Policy": b"same-origin",
    b"Permissions-Policy": b"camera=(), microphone=(), geolocation=()",
}
STATIC_TYPES = {".css": b"text/css; charset=utf-8", ".js": b"text/javascript; charset=utf-8"}

SIGN_IN_FAILED = ("The user name, password or code is not right. Check them and try again; "
                  "after several wrong tries, signing in pauses for a while.")
TRY_LATER = "Signing in is not possible just now. Try again in a minute."
PROTOCOL_NAMES = {"imap": "IMAP (mail)", "pop3": "POP3 (mail)", "smtp": "SMTP (sending mail)",
                  "ldap": "LDAP (directory)"}
REFUSAL_WORDS = {
    "wrong_secret": "wrong password", "wrong_code": "wrong code", "unknown_user": "unknown user",
    "mfa_required": "primary password where an app password is needed",
    "legacy_blocked": "legacy sign-in blocked", "account_inactive": "account not active",
    "locked_out": "locked out", "expired": "app password expired", "unused": "app password unused too long",
    "out_of_scope": "app password not allowed there", "revoked_by_password_change":
    "app password older than the password change", "malformed": "malformed request",
    "too_many_sessions": "too many sessions", "directory_unavailable": "directory did not answer",
    "busy": "busy", "plaintext": "sign-in without TLS",
}


class Request(NoServerHeader, server.Request):
    """Every answer's security headers, and no Server header. A body over
    64 KiB (nothing the portal takes is larger), chunked or not, is never
    kept in memory or spooled to disk, and is answered 413: once read and
    dropped, up to 1 MiB of it; past 1 MiB (declared, or as it comes), at
    once, without waiting for the rest, and the connection closed in good
    order (the answer, TLS's close alert, FIN: :func:`proxy.transports.hang_up`),
    what else the client sends not read."""

    _received = 0
    _too_large = False
    _after_answer: int | None = None  # bytes since an answer made before the body came

    def process(self) -> None:
        if self._after_answer is not None:
            return  # the whole body came after all: answered already
        self._secure()
        if self._too_large:
            self._refuse()
            self.finish()
            return
        super().process()

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_DRAINED:
            # Answered before Twisted's "100 Continue" to a client that asks:
            # such a client then sends no body at all.
            self.requestHeaders.removeHeader(b"Expect")
            self._drop()
            self._answer_now()
            return
        if length is not None and length > MAX_BODY:
            self._drop()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._after_answer is not None:
            self._after_answer += len(data)
            if self._after_answer > AFTER_GOODBYE:
                self.channel.transport.pauseProducing()
            return
        if self._too_large:
            if self._received > MAX_DRAINED:
                self._answer_now()
            return
        if self._received > MAX_BODY:
            self._drop()
            return
        super().handleContentChunk(data)

    def _secure(self) -> None:
        for name, value in HEADERS.items():
            self.setHeader(name, value)

    def _refuse(self) -> None:
        self.setResponseCode(413)
        self.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        self.setHeader(b"Content-Length", b"%d" % len(TOO_LARGE))
        self.write(TOO_LARGE)

    def _drop(self) -> None:
        self._too_large = True
        self.content = io.BytesIO()

    def _answer_now(self) -> None:
        """413 before the body has come, then close: the request is never
        processed, and what the channel still parses of the body is dropped."""
        self._after_answer = 0
        self.clientproto = b"HTTP/1.1"  # Twisted takes the request line with the body
        self._secure()
        self.setHeader(b"Date", http.datetimeToString())
        self.setHeader(b"Connection", b"close")
        self._refuse()
        channel = self.channel
        channel.persistent = False
        hang_up(channel.transport, channel.site.reactor)


class Site(server.Site):
    requestFactory = Request
    displayTracebacks = False
    noisy = False

    def log(self, request: Any) -> None:
        """No access log: what matters is audited, and URLs carry user names."""


class BadForm(Exception):
    """A form that cannot be taken as sent (not UTF-8, a field missing)."""


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


@attrs.frozen
class Row:
    """One app password as a page shows it."""

    record: AppPassword
    stopped: str | None  # why, in words; None: it works
    stopped_at: float | None

    @property
    def protocols(self) -> str:
        if self.record.protocols is None:
            return "all"
        return ", ".join(PROTOCOL_NAMES.get(p, p) for p in sorted(self.record.protocols))

    @property
    def networks(self) -> str:
        return "anywhere" if self.record.networks is None else ", ".join(self.record.networks)


class Portal:
    app = Klein()

    def __init__(
        self,
        *,
        reactor: Any,
        config: Callable[[], Config],
        authenticator: Any,
        admin: Callable[[str], Any],
        store_pool: Any,
        files_pool: Any,
        keybox: secondfactor.KeyBox,
        record: Callable[..., None],
        hash_secret: Callable[[str], Any],
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._auth = authenticator
        self._admin = admin
        self._store_pool = store_pool
        self._files_pool = files_pool
        self._keybox = keybox
        self._record = record
        self._hash = hash_secret  # argon2 in the hashing pool: a Deferred of the hash
        self._checking: set[str] = set()  # accounts whose code is being checked
        self._created: dict[str, list[float]] = {}  # user → recent creations, to pace them
        portal = config().portal
        self.sessions = WebSessions(reactor, portal.session_idle, portal.session_max)
        # Read and compiled once, here (the daemon builds the portal on its
        # files pool): never a file read or stat on the reactor per page.
        self._templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            # Every text a page shows, escaped for people too: an address
            # or a name from the store or the audit file (an old row, a
            # balancer's header) may hold controls or bidirectional overrides.
            finalize=lambda value: printable(value) if type(value) is str else value,
            undefined=jinja2.StrictUndefined,
            auto_reload=False,
            cache_size=-1,
        )
        self._templates.filters["when"] = minute
        self._templates.filters["iso"] = iso
        self._templates.filters["quote"] = lambda s: urllib.parse.quote(s, safe="")
        self._static = {p.name: p.read_bytes() for p in (HERE / "static").iterdir() if p.is_file()}
        for name in self._templates.list_templates():
            self._templates.get_template(name)

    def site(self) -> Site:
        return Site(self.app.resource(), timeout=60, reactor=self._reactor)

    # -- plumbing ------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config()

    def _render(self, request: Any, template: str, status: int = 200, **context: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        values = {"notice": None, "error": None, "session": None, **context}
        page = self._templates.get_template(template).render(
            title=self.config.portal.title, protocol_names=PROTOCOL_NAMES, **values)
        return page.encode("utf-8")

    @staticmethod
    def _address(request: Any) -> str:
        address = request.getClientAddress()
        return getattr(address, "host", None) or "unknown"

    @staticmethod
    def _field(request: Any, name: str, required: bool = True) -> str:
        values = request.args.get(name.encode())
        if not values:
            if required:
                raise BadForm(name)
            return ""
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise BadForm(name) from None

    @staticmethod
    def _fields(request: Any, name: str) -> list[str]:
        try:
            return [v.decode("utf-8") for v in request.args.get(name.encode(), [])]
        except UnicodeDecodeError:
            raise BadForm(name) from None

    @staticmethod
    def _same_origin(request: Any) -> bool:
        """A POST from a page of another site is refused (SameSite=Strict
        already keeps the cookie from it; this answers it plainly)."""
        site = request.getHeader(b"sec-fetch-site")
        if site is not None:
            return site in (b"same-origin", b"none")
        origin = request.getHeader(b"origin")
        if origin is None or origin == b"null":
            return True  # an older browser: the CSRF token decides
        host = request.getHeader(b"host") or b""
        return urllib.parse.urlsplit(origin.decode("latin-1")).netloc.encode("latin-1") == host

    def _token(self, request: Any) -> str | None:
        value = request.getCookie(COOKIE.encode())
        return value.decode("latin-1") if value else None

    def _set_cookie(self, request: Any, name: str, value: str, max_age: int | None = None) -> None:
        request.addCookie(name.encode(), value.encode(), path=b"/", secure=True, httpOnly=True,
                          sameSite="strict", max_age=None if max_age is None else str(max_age).encode())

    def _redirect(self, request: Any, to: str) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"Location", to.encode())
        return b""

    def _forbidden(self, request: Any, text: str = "This page is for the help desk.") -> bytes:
        return self._render(request, "error.html", 403, heading="Not allowed", text=text, session=None)

    async def _signed_in(self, request: Any) -> tuple[WebSession, Account] | bytes:
        """The signed-in session and its account as the directory says now,
        or the answer to give instead (to the sign-in page)."""
        token = self._token(request)
        session = self.sessions.get(token)
        if session is None or session.stage != "signed_in":
            return self._redirect(request, "/sign-in")
        try:
            account = await self._auth.account(session.dn)
        except DirectoryUnavailable:
            return self._render(request, "error.html", 503, heading="Try again in a minute",
                                text="The directory does not answer just now.", session=None)
        changed = account.password_changed_at if account is not None else None
        if account is None or not account.active or (changed is not None and changed > session.started):
            # Gone, disabled, or its password changed since this session began.
            self.sessions.end(token)
            return self._redirect(request, "/sign-in")
        session.admin = account.admin
        return session, account

    def _csrf_ok(self, request: Any, session: WebSession) -> bool:
        try:
            token = self._field(request, "csrf")
        except BadForm:
            return False
        return self._same_origin(request) and same(token, session.csrf)

    def _bad_request(self, request: Any) -> bytes:
        return self._render(request, "error.html", 400, heading="That did not work",
                            text="The form was out of date or incomplete. Go back, reload the "
                                 "page and try again.", session=None)

    async def _on_store(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self._store_pool.submit(function, *args, **kwargs)

    def _rows(self, records: list[AppPassword]) -> list[Row]:
        now = self._reactor.seconds()
        idle = self.config.policy.app_password_idle_expiry
        rows = []
        for record in records:
            reason = record.stopped(now, idle)
            rows.append(Row(record, STOPPED_REASONS.get(reason or "", reason),
                            record.stopped_since(idle) if reason else None))
        # Working ones first, newest first; then stopped ones, latest stopped first.
        return sorted(rows, key=lambda r: (r.stopped is not None,
                                           -(r.stopped_at or r.record.created_at)))

    async def _refresh(self) -> None:
        """Apply the store's change feed now: what a page did takes effect at
        once (sessions of a deleted app password end, lockouts lift)."""
        await self._auth.poll_changes()

    # -- static ----------------------------------------------------------------------

    @app.route("/static/<string:name>", methods=["GET"])
    def static(self, request: Any, name: str) -> bytes:
        body = self._static.get(name)
        kind = STATIC_TYPES.get(Path(name).suffix)
        if body is None or kind is None:
            request.setResponseCode(404)
            return b"not found"
        request.setHeader(b"Content-Type", kind)
        request.setHeader(b"Cache-Control", b"public, max-age=3600")
        return body

    # -- sign-in ---------------------------------------------------------------------

    @app.route("/sign-in", methods=["GET"])
    def sign_in_page(self, request: Any) -> bytes:
        if (session := self.sessions.get(self._token(request))) and session.stage == "signed_in":
            return self._redirect(request, "/")
        return self._sign_in_form(request)

    def _sign_in_form(self, request: Any, status: int = 200, error: str | None = None,
                      username: str = "") -> bytes:
        csrf = secrets.token_urlsafe(32)
        self._set_cookie(request, CSRF_COOKIE, csrf)
        return self._render(request, "sign_in.html", status, csrf=csrf, error=error,
                            username=username, session=None)

    @app.route("/sign-in", methods=["POST"])
    async def sign_in(self, request: Any) -> bytes:
        cookie = (request.getCookie(CSRF_COOKIE.encode()) or b"").decode("latin-1")
        try:
            username = self._field(request, "username", required=False).strip()
            password = self._field(request, "password", required=False)
            code = self._field(request, "code", required=False).strip()
            csrf = self._field(request, "csrf")
        except BadForm:
            return self._bad_request(request)
        if not cookie or not same(csrf, cookie) or not self._same_origin(request):
            return self._bad_request(request)
        if not username or not password:
            return self._sign_in_form(request, 400, "Enter your user name and your password.",
                                      username)
        address = self._address(request)
        started = self._reactor.seconds()
        attempt = Attempt(protocol="portal", realm="on-premises", username=username,
                          secret=password, client_address=address, tls=True, legacy=False,
                          second_factor=True)
        decision = await self._auth.authenticate(attempt)
        if decision.outcome is Outcome.TEMPORARY_FAILURE:
            return self._sign_in_form(request, 503, TRY_LATER, username)
        if not decision.accepted or decision.account is None:
            return self._sign_in_form(request, 401, SIGN_IN_FAILED, username)
        account = decision.account
        if account.key in self._checking:
            # One code check at a time per account: codes are not guessed in parallel.
            return self._sign_in_form(request, 401, SIGN_IN_FAILED, username)
        self._checking.add(account.key)
        try:
            key = await self._on_store(self._load_key, account.username)
            if key is None:
                # First sign-in: set up an authenticator app before anything else.
                self._auth.second_factor_passed(attempt, decision)
                token, _ = self.sessions.start(account.username, account.dn, "enrolling",
                                               pending_key=secondfactor.new_key())
                self._set_cookie(request, COOKIE, token)
                self._record("portal_sign_in", user=account.username, client_address=address,
                             outcome="enrolling")
                return self._redirect(request, "/enrol")
            step = secondfactor.matching_step(key, code, self._reactor.seconds())
            if step is None or not await self._on_store(self._take_step, account.username, step):
                delay = self._auth.second_factor_failed(attempt, decision, code or "-")
                # Counted from when the attempt began, as the core counts a wrong
                # password's: a wrong code takes no longer to be told.
                remaining = started + delay - self._reactor.seconds()
                if remaining > 0:
                    await deferLater(self._reactor, remaining)
                return self._sign_in_form(request, 401, SIGN_IN_FAILED, username)
        except (StoreError, Busy, secondfactor.SealError) as e:
            log.error("portal sign-in of {user}: {error}", user=account.username, error=str(e))
            return self._sign_in_form(request, 503, TRY_LATER, username)
        finally:
            self._checking.discard(account.key)
        self._auth.second_factor_passed(attempt, decision)
        token, _ = self.sessions.start(account.username, account.dn, "signed_in")
        self._set_cookie(request, COOKIE, token)
        self._record("portal_sign_in", user=account.username, client_address=address,
                     outcome="accepted")
        return self._redirect(request, "/")

    def _load_key(self, username: str) -> str | None:
        """On the store's thread: the user's TOTP key, opened; None if they
        have none. A key that does not open (another key file) raises
        SealError: a fault to fix, not a wrong code."""
        sealed = self._admin("portal").sealed_second_factor(username)
        return None if sealed is None else self._keybox.open(username, sealed)

    def _take_step(self, username: str, step: int) -> bool:
        return self._admin("portal").take_second_factor_step(username, step)

    @app.route("/enrol", methods=["GET"])
    def enrol_page(self, request: Any) -> bytes:
        session = self.sessions.get(self._token(request))
        if session is None or session.stage != "enrolling" or session.pending_key is None:
            return self._redirect(request, "/sign-in")
        return self._enrol_form(request, session)

    def _enrol_form(self, request: Any, session: WebSession, status: int = 200,
                    error: str | None = None) -> bytes:
        assert session.pending_key is not None
        uri = secondfactor.provisioning_uri(session.pending_key, session.username,
                                            self.config.portal.title)
        qr = segno.make(uri, error="m").svg_data_uri(scale=5, dark="#000", light="#fff")
        return self._render(request, "enrol.html", status, session=session, qr=qr,
                            key=secondfactor.grouped(session.pending_key), error=error,
                            self_service=self.config.policy.allow_user_app_passwords)

    @app.route("/enrol", methods=["POST"])
    async def enrol(self, request: Any) -> bytes:
        token = self._token(request)
        session = self.sessions.get(token)
        if session is None or session.stage != "enrolling" or session.pending_key is None:
            return self._redirect(request, "/sign-in")
        if not self._csrf_ok(request, session):
            return self._bad_request(request)
        code = self._field(request, "code", required=False)
        step = secondfactor.matching_step(session.pending_key, code, self._reactor.seconds())
        if step is None:
            return self._enrol_form(request, session, 400,
                                    "That code is not right. Enter the 6 digits your app shows "
                                    "now; if it just changed, enter the new one.")
        sealed = self._keybox.seal(session.username, session.pending_key)
        actor = f"portal:{session.username}"
        try:
            await self._on_store(self._admin(actor).enrol_second_factor, session.username,
                                 sealed, step)
        except AdminError:
            # Enrolled meanwhile (another session): this one may not replace it.
            self.sessions.end(token)
            return self._sign_in_form(request, 409, "You have set up an authenticator app "
                                      "already. Sign in with a code from it.", session.username)
        except (StoreError, Busy):
            return self._enrol_form(request, session, 503, TRY_LATER)
        await self._refresh()
        self.sessions.end(token)
        self.sessions.end_user(session.username, stage="enrolling")
        token, fresh = self.sessions.start(session.username, session.dn, "signed_in",
                                           started=session.started)
        fresh.notice = "Your authenticator app is set up. You will be asked for a code at every sign-in."
        self._set_cookie(request, COOKIE, token)
        self._record("portal_sign_in", user=session.username,
                     client_address=self._address(request), outcome="accepted")
        return self._redirect(request, "/")

    @app.route("/sign-out", methods=["POST"])
    def sign_out(self, request: Any) -> bytes:
        # Whatever the form says: signing out can only ever help its user.
        self.sessions.end(self._token(request))
        self._set_cookie(request, COOKIE, "", max_age=0)
        return self._redirect(request, "/sign-in")

    # -- security info -----------------------------------------------------------------

    @app.route("/", methods=["GET"])
    async def home(self, request: Any) -> bytes:
        found = await self._signed_in(request)
        if isinstance(found, bytes):
            return found
        session, account = found
        return await self._home(request, session, account)

    async def _home(self, request: Any, session: WebSession, account: Account, status: int = 200,
                    error: str | None = None, form: dict[str, Any] | None = None) -> bytes:
        admin = self._admin(f"portal:{session.username}")
        try:
            records = await self._on_store(admin.list, session.username)
        except (StoreError, Busy):
            return self._render(request, "error.html", 503, heading="Try again in a minute",
                                text="The app-password store does not answer just now.",
                                session=session)
        policy = self.config.policy
        rows = self._rows(records)
        working = sum(1 for r in rows if r.stopped is None)
        notice, session.notice = session.notice, None
        return self._render(
            request, "home.html", status, session=session, account=account, rows=rows,
            working=working, limit=policy.max_app_passwords_per_user,
            self_service=policy.allow_user_app_passwords,
            blocked=policy.block_legacy_auth or account.modern_auth_only,
            blocked_for_all=policy.block_legacy_auth,
            notice=notice, error=error, form=form or {}, protocols=PROTOCOLS,
        )

    @app.route("/app-passwords", methods=["POST"])
    async def create(self, request: Any) -> bytes:
        found = await self._entry(request, form=True)
        if isinstance(found, bytes):
            return found
        session, account = found
        if not self.config.policy.allow_user_app_passwords:
            return self._forbidden(request, "App passwords are managed by the help desk here.")
        try:
            name = self._field(request, "name", required=False).strip()
            expires = self._field(request, "expires", required=False).strip()
            chosen = self._fields(request, "protocols")
            networks_text = self._field(request, "networks", required=False)
        except BadForm:
            return self._bad_request(request)
        form = {"name": name, "expires": expires, "protocols": chosen, "networks": networks_text}
        problem, expires_at, protocols, networks = self._create_fields(
            name, expires, chosen, networks_text)
        if problem:
            return await self._home(request, session, account, 400, problem, form)
        made = await self._make(session, session.username, name, expires_at, protocols, networks)
        if isinstance(made, tuple):
            status, problem = made
            return await self._home(request, session, account, status, problem, form)
        self._notify(account, made.record.name, request, f"portal:{session.username}")
        return self._render(request, "created.html", 201, session=session, record=made.record,
                            secret=apppasswords.display(made.secret), owner=None,
                            row=self._rows([made.record])[0])

    async def _make(self, session: WebSession, username: str, name: str,
                    expires_at: float | None, protocols: frozenset[str] | None,
                    networks: tuple[str, ...] | None) -> Any:
        """Create an app password for ``username`` as the session's user:
        the Created, or (status, what to tell them). The rules are Admin's;
        argon2 runs in the hashing pool, never on the store's thread."""
        admin = self._admin(f"portal:{session.username}")
        now = self._reactor.seconds()
        recent = [t for t in self._created.get(session.username, []) if now - t < 60]
        if len(recent) >= CREATIONS_PER_MINUTE:
            return 429, "That is many app passwords in a minute. Wait a minute, then try again."
        try:
            username, networks = admin.checked(username, name, expires_at=expires_at,
                                               protocols=protocols, networks=networks)
        except AdminError as e:
            text = str(e)
            return 400, text[0].upper() + text[1:] + "."
        self._created[session.username] = recent + [now]
        secret = apppasswords.generate()
        try:
            encoded = await self._hash(secret)
            return await self._on_store(admin.create, username, name, expires_at=expires_at,
                                        protocols=protocols, networks=networks, secret=secret,
                                        password_hash=encoded)
        except LimitReached as e:
            return 409, (f"{'You have' if username == session.username else username + ' has'} "
                         f"{e.count} app passwords, the most allowed. Delete one that is no "
                         f"longer used, then create the new one.")
        except NameTaken:
            return 409, (f"There is an app password named {name!r} already. Choose another "
                         f"name, or delete that one first.")
        except AdminError as e:
            return 400, f"{e}."
        except (StoreError, Busy):
            return 503, TRY_LATER

    def _create_fields(self, name: str, expires: str, chosen: list[str], networks_text: str
                       ) -> tuple[str | None, float | None, frozenset[str] | None, tuple[str, ...] | None]:
        if not name:
            return "Give the app password the name of the device it is for.", None, None, None
        problem = apppasswords.check_name(name)
        if problem:
            return problem[0].upper() + problem[1:] + ".", None, None, None
        expires_at = None
        if expires:
            try:
                expires_at = parse_expiry(expires, self._reactor.seconds())
            except ValueError:
                return "Give the expiry as a date (2027-01-31), or leave it empty.", None, None, None
            if len(expires) == 10:
                expires_at += 86400  # "expires on" a day: it works all of that day (UTC)
            if expires_at <= self._reactor.seconds():
                return "The expiry is in the past: choose a later date.", None, None, None
        protocols = None
        if chosen:
            if not set(chosen) <= set(PROTOCOLS):
                return "Choose protocols from the list.", None, None, None
            if set(chosen) != set(PROTOCOLS):
                protocols = frozenset(chosen)
        networks = None
        parts = networks_text.replace(",", " ").split()
        if parts:
            networks = tuple(parts)
        return None, expires_at, protocols, networks

    def _notify(self, account: Account, device: str, request: Any, actor: str) -> None:
        portal = self.config.portal
        if not portal.notify_on_create or portal.mail_relay is None or not account.mail:
            return
        try:
            notify.notify_created(
                self._reactor, portal.mail_relay, portal.mail_from, account.mail,
                username=account.username, device=device, at=self._reactor.seconds(),
                address=self._address(request), actor=actor, title=portal.title)
        except Exception:
            # The app password exists: its page must be shown whatever the mail does.
            log.failure("cannot mail {user} of a new app password", user=account.username)

    @app.route("/app-passwords/<string:id>/delete", methods=["GET"])
    async def delete_page(self, request: Any, id: str) -> bytes:
        found = await self._signed_in(request)
        if isinstance(found, bytes):
            return found
        session, _ = found
        record = await self._own(session.username, id)
        if record is None or not self.config.policy.allow_user_app_passwords:
            return self._redirect(request, "/")
        return self._render(request, "confirm.html", session=session,
                            heading=f"Delete the app password “{record.name}”?",
                            text=f"The device that uses it ({record.name}) stops at once: its "
                                 f"open connections end and it cannot sign in again. This "
                                 f"cannot be undone; you can create a new one.",
                            action=f"/app-passwords/{urllib.parse.quote(id, safe='')}/delete",
                            button="Delete it", cancel="/")

    async def _own(self, username: str, id: str) -> AppPassword | None:
        try:
            records = await self._on_store(self._admin("portal").list, username)
        except (AdminError, StoreError, Busy):
            return None
        return next((r for r in records if r.id == id), None)

    @app.route("/app-passwords/<string:id>/delete", methods=["POST"])
    async def delete(self, request: Any, id: str) -> bytes:
        found = await self._entry(request, form=True)
        if isinstance(found, bytes):
            return found
        session, account = found
        if not self.config.policy.allow_user_app_passwords:
            return self._forbidden(request, "App passwords are managed by the help desk here.")
        record = await self._own(session.username, id)
        if record is None:
            return self._redirect(request, "/")
        try:
            await self._on_store(self._admin(f"portal:{session.username}").delete,
                                 session.username, record.id)
        except (AdminError, StoreError, Busy):
            return await self._home(request, session, account, 503, TRY_LATER)
        await self._refresh()
        session.notice = f"Deleted the app password “{record.name}”."
        return self._redirect(request, "/")

    # -- help desk ----------------------------------------------------------------------

    async def _help_desk(self, request: Any) -> tuple[WebSession, Account] | bytes:
        return await self._entry(request, help_desk=True)

    async def _entry(self, request: Any, *, help_desk: bool = False,
                     form: bool = False) -> tuple[WebSession, Account] | bytes:
        """Who may see this page: the signed-in session and its account, or
        the answer instead (sign-in, 403 for the help desk's pages to anyone
        else, 400 for a form without its CSRF token or from another site)."""
        found = await self._signed_in(request)
        if isinstance(found, bytes):
            return found
        if help_desk and not found[1].admin:
            return self._forbidden(request)
        if form and not self._csrf_ok(request, found[0]):
            return self._bad_request(request)
        return found

    @app.route("/helpdesk", methods=["GET"])
    async def help_desk(self, request: Any) -> bytes:
        found = await self._help_desk(request)
        if isinstance(found, bytes):
            return found
        session, _ = found
        try:
            wanted = self._field(request, "user", required=False).strip()
        except BadForm:
            return self._bad_request(request)
        error = None
        if wanted:
            try:
                account = await self._auth.account(wanted)
            except DirectoryUnavailable:
                account, error = None, "The directory does not answer just now; try again."
            if account is not None:
                return self._redirect(request, "/helpdesk/users/" + urllib.parse.quote(account.username, safe=""))
            error = error or f"No user named {wanted!r} in the directory. Check the spelling, or " \
                             f"search by mail address."
        notice, session.notice = session.notice, None
        return self._render(request, "helpdesk.html", 404 if error else 200, session=session,
                            wanted=wanted, error=error, notice=notice)

    async def _subject(self, name: str) -> Account | None:
        try:
            return await self._auth.account(name)
        except DirectoryUnavailable:
            return None

    @app.route("/helpdesk/users/<string:name>", methods=["GET"])
    async def help_desk_user(self, request: Any, name: str) -> bytes:
        found = await self._help_desk(request)
        if isinstance(found, bytes):
            return found
        session, _ = found
        subject = await self._subject(name)
        if subject is None:
            session.notice = f"No user named {name!r} in the directory (or it does not answer)."
            return self._redirect(request, "/helpdesk")
        admin = self._admin(f"portal:{session.username}")

        def read() -> tuple[Any, list[AppPassword], bool]:
            return admin.user(subject.username), admin.list(subject.username), \
                admin.has_second_factor(subject.username)

        try:
            user, records, enrolled = await self._on_store(read)
        except (StoreError, Busy):
            return self._render(request, "error.html", 503, heading="Try again in a minute",
                                text="The app-password store does not answer just now.",
                                session=session)
        refusals = await self._refusals(subject.username)
        notice, session.notice = session.notice, None
        return self._render(
            request, "helpdesk_user.html", session=session, subject=subject, user=user,
            rows=self._rows(records), enrolled=enrolled, locked=self._auth.locked(subject),
            refusals=refusals, notice=notice, states=[s.value for s in MfaState],
            words=REFUSAL_WORDS, quoted=urllib.parse.quote(subject.username, safe=""),
        )

    async def _refusals(self, username: str) -> list[dict[str, Any]]:
        path = self.config.audit.file
        if path is None:
            return []

        def wanted(event: dict[str, Any]) -> bool:
            return (event.get("event") == "authentication" and event.get("user") == username
                    and event.get("outcome") != "accepted")

        try:
            return await self._files_pool.submit(
                recent_events, path, wanted, 20, self.config.portal.audit_scan_bytes)
        except (OSError, Busy):
            return []

    ACTIONS = {
        "revoke-all": ("Delete all app passwords of {user}?",
                       "Every device of {user} that uses an app password stops at once. They "
                       "can create new ones (where self-service is on), or you can.",
                       "Delete them all"),
        "reset-second-factor": ("Reset the authenticator of {user}?",
                                "{user} sets up an authenticator app again at their next "
                                "sign-in to this portal (for a lost or replaced phone).",
                                "Reset it"),
        "unlock": ("Lift the lockout of {user}?",
                   "Failed sign-ins of {user} are forgotten on every node; they can try again "
                   "at once.", "Lift it"),
    }

    @app.route("/helpdesk/users/<string:name>/<string:action>", methods=["GET"])
    async def help_desk_confirm(self, request: Any, name: str, action: str) -> bytes:
        found = await self._help_desk(request)
        if isinstance(found, bytes):
            return found
        session, _ = found
        if action not in self.ACTIONS:
            return self._redirect(request, "/helpdesk")
        heading, text, button = self.ACTIONS[action]
        quoted = urllib.parse.quote(name, safe="")
        return self._render(request, "confirm.html", session=session,
                            heading=heading.format(user=name), text=text.format(user=name),
                            action=f"/helpdesk/users/{quoted}/{action}", button=button,
                            cancel=f"/helpdesk/users/{quoted}")

    @app.route("/helpdesk/users/<string:name>/<string:action>", methods=["POST"])
    async def help_desk_act(self, request: Any, name: str, action: str) -> bytes:
        found = await self._entry(request, help_desk=True, form=True)
        if isinstance(found, bytes):
            return found
        session, _ = found
        subject = await self._subject(name)
        if subject is None:
            return self._redirect(request, "/helpdesk")
        admin = self._admin(f"portal:{session.username}")
        user = subject.username
        try:
            if action == "revoke-all":
                gone = await self._on_store(admin.revoke_all, user)
                session.notice = f"Deleted all {len(gone)} app passwords of {user}."
            elif action == "reset-second-factor":
                await self._on_store(admin.reset_second_factor, user)
                self.sessions.end_user(user)
                session.notice = f"{user} sets up an authenticator app at their next sign-in."
            elif action == "unlock":
                await self._on_store(admin.unlock, user)
                session.notice = f"Lifted the lockout of {user}."
            elif action == "mfa":
                state = MfaState(self._field(request, "state"))
                await self._on_store(admin.set_mfa, user, state)
                session.notice = f"The MFA state of {user} is now {state.value}."
            else:
                return self._redirect(request, "/helpdesk")
        except (BadForm, ValueError):
            return self._bad_request(request)
        except (AdminError, StoreError, Busy) as e:
            session.notice = f"That did not work: {e}" if str(e) else TRY_LATER
        await self._refresh()
        return self._redirect(request, f"/helpdesk/users/{urllib.parse.quote(user, safe='')}")

    @app.route("/helpdesk/users/<string:name>/app-passwords", methods=["POST"])
    async def help_desk_create(self, request: Any, name: str) -> bytes:
        """The help desk makes an app password for a user (where users may
        not, or for one who cannot): shown once, to the help desk."""
        found = await self._entry(request, help_desk=True, form=True)
        if isinstance(found, bytes):
            return found
        session, _ = found
        subject = await self._subject(name)
        if subject is None:
            return self._redirect(request, "/helpdesk")
        quoted = urllib.parse.quote(subject.username, safe="")
        device = self._field(request, "name", required=False).strip()
        problem, expires_at, protocols, networks = self._create_fields(
            device, self._field(request, "expires", required=False).strip(),
            self._fields(request, "protocols"), self._field(request, "networks", required=False))
        made = problem or await self._make(session, subject.username, device, expires_at,
                                           protocols, networks)
        if isinstance(made, (str, tuple)):
            session.notice = made if isinstance(made, str) else made[1]
            return self._redirect(request, f"/helpdesk/users/{quoted}")
        self._notify(subject, made.record.name, request, f"portal:{session.username}")
        return self._render(request, "created.html", 201, session=session, record=made.record,
                            secret=apppasswords.display(made.secret), owner=subject.username,
                            row=self._rows([made.record])[0])

    @app.route("/helpdesk/users/<string:name>/app-passwords/<string:id>/delete", methods=["GET"])
    async def help_desk_delete_page(self, request: Any, name: str, id: str) -> bytes:
        found = await self._help_desk(request)
        if isinstance(found, bytes):
            return found
        session, _ = found
        record = await self._own(name, id)
        quoted = urllib.parse.quote(name, safe="")
        if record is None:
            return self._redirect(request, f"/helpdesk/users/{quoted}")
        return self._render(request, "confirm.html", session=session,
                            heading=f"Delete the app password “{record.name}” of {name}?",
                            text="The device that uses it stops at once: its open connections "
                                 "end and it cannot sign in again.",
                            action=f"/helpdesk/users/{quoted}/app-passwords/"
                                   f"{urllib.parse.quote(id, safe='')}/delete",
                            button="Delete it", cancel=f"/helpdesk/users/{quoted}")

    @app.route("/helpdesk/users/<string:name>/app-passwords/<string:id>/delete", methods=["POST"])
    async def help_desk_delete(self, request: Any, name: str, id: str) -> bytes:
        found = await self._entry(request, help_desk=True, form=True)
        if isinstance(found, bytes):
            return found
        session, _ = found
        quoted = urllib.parse.quote(name, safe="")
        record = await self._own(name, id)
        if record is not None:
            try:
                await self._on_store(self._admin(f"portal:{session.username}").delete, name, id)
                session.notice = f"Deleted the app password “{record.name}” of {name}."
            except (AdminError, StoreError, Busy):
                session.notice = TRY_LATER
            await self._refresh()
        return self._redirect(request, f"/helpdesk/users/{quoted}")

    @app.handle_errors(BadForm)
    def bad_form(self, request: Any, failure: Any) -> bytes:
        return self._bad_request(request)
