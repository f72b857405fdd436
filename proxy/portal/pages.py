"""What every part of the portal shares: rendering a page, reading a form,
the gate in front of every page (signed in, help desk, the form's CSRF token
and origin), and the errors a page raises instead of answering.

A page that cannot be shown raises a :class:`PageError` (or a
:class:`Redirect`); one handler on the portal's Klein app turns it into the
answer, so that no page has to test what a helper gave back.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

import attrs
import jinja2
from klein import Klein
from twisted.logger import Logger

from proxy.admin import AdminError
from proxy.audit import recent_events
from proxy.config import Config
from proxy.directory import Account, DirectoryUnavailable
from proxy.portal.websessions import COOKIE, WebSession, WebSessions, fresh as fresh_enough, same
from proxy.portal.words import Refusal, is_refusal_of, needle_of, refusal
from proxy.store import STOPPED_REASONS, AppPassword, StoreError
from proxy.threads import Busy

log = Logger(namespace="legacy_auth_proxy.portal")

TRY_LATER = "Signing in is not possible just now. Try again in a minute."
PROTOCOL_NAMES = {"imap": "IMAP (mail)", "pop3": "POP3 (mail)", "smtp": "SMTP (sending mail)",
                  "ldap": "LDAP (directory)"}


class PageError(Exception):
    """The page cannot be shown: the error page is answered instead, with
    this status, heading and text (and the menu, given a session)."""

    status = 500
    heading = "That did not work"
    text = ""

    def __init__(self, text: str | None = None, *, session: WebSession | None = None) -> None:
        super().__init__(text or self.text)
        if text is not None:
            self.text = text
        self.session = session


class BadRequest(PageError):
    status = 400
    text = "The form was out of date or incomplete. Go back, reload the page and try again."


class BadForm(BadRequest):
    """A form that cannot be taken as sent (not UTF-8, a field missing)."""

    def __init__(self, field: str) -> None:
        super().__init__()
        self.field = field


class Forbidden(PageError):
    status = 403
    heading = "Not allowed"
    text = "This page is for the help desk."


class Unavailable(PageError):
    status = 503
    heading = "Try again in a minute"


class Redirect(Exception):
    """The page is elsewhere: answered with a 303 to ``to``."""

    def __init__(self, to: str) -> None:
        super().__init__(to)
        self.to = to


class SignInNeeded(Redirect):
    def __init__(self) -> None:
        super().__init__("/sign-in")


class FreshCheckNeeded(Redirect):
    """The action needs a recent proof of who the user is
    (``portal.fresh_check``): to the fresh check, then back to ``back``."""

    def __init__(self, back: str) -> None:
        super().__init__("/confirm-it-is-you?next=" + quote(back))
        self.back = back


def local_path(value: str | None) -> str:
    """``value`` if it is a path on this site, else "/": what a page may be
    sent back to (never another site's URL)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def quote(text: str) -> str:
    """``text`` as one segment of a URL."""
    return urllib.parse.quote(text, safe="")


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


@attrs.frozen
class Context:
    """What every part of the portal is built with."""

    reactor: Any
    config: Callable[[], Config]
    authenticator: Any
    admin: Callable[[str], Any]  # the admin rules, acting as the actor named
    store_pool: Any
    sessions: WebSessions
    templates: jinja2.Environment  # read and compiled once, when the portal is built
    record: Callable[..., None]  # an audit event
    files_pool: Any = None  # reads the audit file (recent refused sign-ins)


Handler = TypeVar("Handler", bound=Callable[..., Any])


def page(path: str, method: str) -> Callable[[Handler], Handler]:
    """Marks a method of :class:`Pages` as the page at ``path`` for
    ``method``: :meth:`Pages.mount` puts it on the portal's app."""

    def mark(handler: Handler) -> Handler:
        handler.page = (path, method)  # type: ignore[attr-defined]
        return handler

    return mark


class Pages:
    """One part of the portal: its pages (methods marked with :func:`page`)
    and what every part uses to answer."""

    def __init__(self, context: Context) -> None:
        self._reactor = context.reactor
        self._config = context.config
        self._auth = context.authenticator
        self._admin = context.admin
        self._store_pool = context.store_pool
        self._templates = context.templates
        self._record = context.record
        self._files_pool = context.files_pool
        self.sessions = context.sessions

    def mount(self, app: Klein) -> None:
        for cls in type(self).__mro__:
            for name, handler in vars(cls).items():
                if hasattr(handler, "page"):
                    path, method = handler.page
                    app.route(path, methods=[method],
                              endpoint=f"{type(self).__name__}.{name}")(getattr(self, name))

    @property
    def config(self) -> Config:
        return self._config()

    # -- answering ---------------------------------------------------------------------

    def _render(self, request: Any, template: str, status: int = 200, **context: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        values = {"notice": None, "error": None, "session": None, **context}
        page = self._templates.get_template(template).render(
            title=self.config.portal.title, protocol_names=PROTOCOL_NAMES, **values)
        return page.encode("utf-8")

    @staticmethod
    def _redirect(request: Any, to: str) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"Location", to.encode())
        return b""

    def failed(self, request: Any, failure: Any) -> bytes:
        """The answer to a page that raised a PageError or a Redirect. A
        signed-in user keeps the menu and the sign-out on an error page,
        whichever check refused (a form out of date, a page not theirs)."""
        error = failure.value
        if isinstance(error, Redirect):
            return self._redirect(request, error.to)
        session = error.session
        if session is None:
            found = self.sessions.get(self._token(request))
            session = found if found is not None and found.stage == "signed_in" else None
        return self._render(request, "error.html", error.status, heading=error.heading,
                            text=error.text, session=session)

    # -- reading the request ----------------------------------------------------------------

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

    @staticmethod
    def _token(request: Any) -> str | None:
        value = request.getCookie(COOKIE.encode())
        return value.decode("latin-1") if value else None

    @staticmethod
    def _set_cookie(request: Any, name: str, value: str, max_age: int | None = None) -> None:
        request.addCookie(name.encode(), value.encode(), path=b"/", secure=True, httpOnly=True,
                          sameSite="strict", max_age=None if max_age is None else str(max_age).encode())

    # -- the gate ----------------------------------------------------------------------

    async def _signed_in(self, request: Any, *, help_desk: bool = False, form: bool = False,
                         fresh: bool = False) -> tuple[WebSession, Account]:
        """The signed-in session and its account as the directory says now.
        Raises SignInNeeded without one, Forbidden for the help desk's pages
        to anyone else, BadRequest for a form without its CSRF token or
        from another site. Every help-desk form, and any page asked
        ``fresh``, also needs a proof of who the user is no older than
        ``portal.fresh_check``: FreshCheckNeeded without one."""
        token = self._token(request)
        session = self.sessions.get(token)
        if session is None or session.stage != "signed_in":
            raise SignInNeeded()
        try:
            account = await self._auth.account(session.dn)
        except DirectoryUnavailable:
            raise Unavailable("The directory does not answer just now.") from None
        changed = account.password_changed_at if account is not None else None
        if account is None or not account.active or (changed is not None and changed > session.started):
            # Gone, disabled, or its password changed since this session began.
            self.sessions.end(token)
            raise SignInNeeded()
        session.admin = account.admin
        session.address = self._address(request)
        session.agent = (request.getHeader(b"user-agent") or b"")[:200].decode("utf-8", "replace")
        if help_desk and not account.admin:
            raise Forbidden()
        if form:
            self._check_form(request, session)
        if (fresh or (help_desk and form)) and not fresh_enough(
                session, self._reactor.seconds(), self.config.portal.fresh_check):
            raise FreshCheckNeeded(self._back(request))
        return session, account

    @staticmethod
    def _back(request: Any) -> str:
        """The page a form was sent from (this site's only), to return to."""
        referer = request.getHeader(b"referer")
        if referer is None:
            return "/"
        parts = urllib.parse.urlsplit(referer.decode("latin-1"))
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if parts.netloc != host:
            return "/"
        return local_path(parts.path + (f"?{parts.query}" if parts.query else ""))

    def _check_form(self, request: Any, session: WebSession) -> None:
        """Raises BadRequest unless the form carries the session's CSRF token
        and comes from this site."""
        token = self._field(request, "csrf")  # BadForm without it: a BadRequest
        if not (self._same_origin(request) and same(token, session.csrf)):
            raise BadRequest()

    # -- shared work -------------------------------------------------------------------

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

    async def _own(self, username: str, id: str) -> AppPassword | None:
        """The app password ``id`` of ``username``; None if there is none
        (or the store does not answer)."""
        try:
            records = await self._on_store(self._admin("portal").list, username)
        except (AdminError, StoreError, Busy):
            return None
        return next((r for r in records if r.id == id), None)

    async def _refusals(self, username: str, limit: int = 20) -> list[Refusal]:
        """The latest refused sign-ins of ``username`` from the audit file,
        newest first (none without one, or when it cannot be read)."""
        path = self.config.audit.file
        if path is None or self._files_pool is None:
            return []
        try:
            events = await self._files_pool.submit(
                recent_events, path, is_refusal_of(username), limit,
                self.config.portal.audit_scan_bytes, needle_of(username))
        except (OSError, Busy):
            return []
        return [refusal(e) for e in events]

    async def _tell(self, dn: str, address: str, notice: Any, **fields: Any) -> None:
        """Mail the user a notice (``notify.notify_second_factor``,
        ``notify.notify_passkey``) where a relay is set and the directory
        knows their address, in the background: what it tells of is never
        held up or undone by the mail."""
        portal = self.config.portal
        if portal.mail_relay is None:
            return
        try:
            account = await self._auth.account(dn)
        except DirectoryUnavailable:
            account = None
        if account is None or not account.mail:
            return
        try:
            notice(self._reactor, portal.mail_relay, portal.mail_from, account.mail,
                   username=account.username, at=self._reactor.seconds(), address=address,
                   title=portal.title, **fields)
        except Exception:
            log.failure("cannot mail {user} a notice", user=account.username)

    async def _refresh(self) -> None:
        """Apply the store's change feed now: what a page did takes effect at
        once (sessions of a deleted app password end, lockouts lift)."""
        await self._auth.poll_changes()
