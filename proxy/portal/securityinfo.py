"""A user's own security info: their app passwords, read-only or, where the
operator allows self-service, created and deleted by them; those the help
desk made for them, said so at the top; their recent refused sign-ins ("why
does my phone fail?") and their signed-in portal sessions; their passkeys
(:mod:`~proxy.portal.passkeys` registers and removes them)."""

from __future__ import annotations

from typing import Any

from proxy import apppasswords
from proxy.admin import AdminError
from proxy.audit import minute
from proxy.directory import Account
from proxy.portal.making import CannotCreate, Maker, Shown
from proxy.portal.pages import TRY_LATER, Context, Forbidden, Pages, Unavailable, page, quote
from proxy.portal.websessions import WebSession
from proxy.store import PROTOCOLS, StoreError
from proxy.threads import Busy

MANAGED = "App passwords are managed by the help desk here."
SHOWN_ALREADY = ("A new app password is shown once only, and it was: it is not shown again. If "
                 "the device did not get it, delete it and create another.")
OWN_REFUSALS = 10


class SecurityInfo(Pages):
    def __init__(self, context: Context, maker: Maker, passkeys: bool = False) -> None:
        super().__init__(context)
        self._maker = maker
        self._passkeys = passkeys  # portal.passkeys_origin is set: list them, offer more

    @page("/", "GET")
    async def home(self, request: Any) -> bytes:
        session, account = await self._signed_in(request)
        return await self._home(request, session, account)

    async def _home(self, request: Any, session: WebSession, account: Account, status: int = 200,
                    error: str | None = None, form: dict[str, Any] | None = None) -> bytes:
        admin = self._admin(f"portal:{session.username}")
        def read() -> tuple[list[Any], list[Any] | None]:
            return admin.list(session.username), \
                admin.passkeys(session.username) if self._passkeys else None

        try:
            records, passkeys = await self._on_store(read)
        except (StoreError, Busy):
            raise Unavailable("The app-password store does not answer just now.",
                              session=session) from None
        policy = self.config.policy
        rows = self._rows(records)
        working = sum(1 for r in rows if r.stopped is None)
        mine = f"portal:{session.username}"
        # Made by the help desk, who saw the secret: said every time the
        # page is shown, while the app password is there.
        by_help_desk = [r.record for r in rows
                        if r.record.created_by.startswith("portal:") and r.record.created_by != mine]
        notice, session.notice = session.notice, None
        return self._render(
            request, "home.html", status, session=session, account=account, rows=rows,
            working=working, limit=policy.max_app_passwords_per_user,
            self_service=policy.allow_user_app_passwords,
            blocked=policy.block_legacy_auth or account.modern_auth_only,
            blocked_for_all=policy.block_legacy_auth,
            notice=notice, error=error, form=form or {}, protocols=PROTOCOLS,
            by_help_desk=by_help_desk, web_sessions=self.sessions.of_user(session.username),
            passkeys=passkeys,
        )

    @page("/refused-sign-ins", "GET")
    async def refused(self, request: Any) -> bytes:
        """"Why does my phone fail?": the user's latest refused sign-ins,
        read from the audit file when asked for, not on every visit."""
        session, _ = await self._signed_in(request)
        return self._render(request, "refused.html", session=session,
                            refusals=await self._refusals(session.username, OWN_REFUSALS))

    @page("/sessions/<string:id>/end", "GET")
    async def end_session_page(self, request: Any, id: str) -> bytes:
        session, _ = await self._signed_in(request)
        other = self._other_session(session, id)
        if other is None:
            return self._redirect(request, "/")
        where = f" from {other.address}" if other.address else ""
        return self._render(request, "confirm.html", session=session,
                            heading="Sign out that browser?",
                            text=f"The browser{where}, last seen {minute(other.seen)}, is "
                                 f"signed out of this page at once: whoever uses it must sign "
                                 f"in again.",
                            action=f"/sessions/{quote(id)}/end", button="Sign it out",
                            cancel="/")

    @page("/sessions/<string:id>/end", "POST")
    async def end_session(self, request: Any, id: str) -> bytes:
        session, _ = await self._signed_in(request, form=True)
        if self._other_session(session, id) is None:
            return self._redirect(request, "/")
        ended = self.sessions.end_one(session.username, id)
        if ended is not None:
            self._record("portal_session_ended", user=session.username,
                         client_address=self._address(request),
                         ended_address=ended.address or None, actor=f"portal:{session.username}")
            session.notice = "That browser is signed out."
        return self._redirect(request, "/")

    def _other_session(self, session: WebSession, id: str) -> WebSession | None:
        """The user's live session ``id`` names, if it is not this one
        (signing out here is the menu's sign-out)."""
        return next((s for s in self.sessions.of_user(session.username)
                     if s.id == id and s is not session), None)

    @page("/app-passwords", "POST")
    async def create(self, request: Any) -> bytes:
        # Minting a secret that reads mail needs a recent proof of who the
        # user is, however old the page session (portal.fresh_check).
        session, account = await self._signed_in(request, form=True, fresh=True)
        if not self.config.policy.allow_user_app_passwords:
            raise Forbidden(MANAGED)
        name = self._field(request, "name", required=False).strip()
        expires = self._field(request, "expires", required=False).strip()
        chosen = self._fields(request, "protocols")
        networks = self._field(request, "networks", required=False)
        offset = self._field(request, "utc_offset", required=False).strip()
        form = {"name": name, "expires": expires, "protocols": chosen, "networks": networks}
        try:
            wanted = self._maker.wanted(name, expires, chosen, networks, offset)
            made = await self._maker.make(session.username, session.username, wanted)
        except CannotCreate as e:
            return await self._home(request, session, account, e.status, e.text, form)
        self._maker.notify(account, made.record.name, self._address(request),
                           f"portal:{session.username}")
        # Shown on the page the redirect leads to: reloading that page
        # sends no form again (no "already exists", nothing counted).
        session.shown = Shown(made.record, apppasswords.display(made.secret), None)
        return self._redirect(request, "/app-passwords/new")

    @page("/app-passwords/new", "GET")
    async def created(self, request: Any) -> bytes:
        """The new app password (the user's own, or the one the help desk
        just made), once: the session forgets it as it is shown."""
        session, _ = await self._signed_in(request)
        shown, session.shown = session.shown, None
        if not isinstance(shown, Shown):
            session.notice = SHOWN_ALREADY
            return self._redirect(request, "/")
        return self._render(request, "created.html", session=session, record=shown.record,
                            secret=shown.secret, owner=shown.owner)

    @page("/app-passwords/<string:id>/delete", "GET")
    async def delete_page(self, request: Any, id: str) -> bytes:
        session, _ = await self._signed_in(request)
        record = await self._own(session.username, id)
        if record is None or not self.config.policy.allow_user_app_passwords:
            return self._redirect(request, "/")
        return self._render(request, "confirm.html", session=session,
                            heading=f"Delete the app password “{record.name}”?",
                            text=f"The device that uses it ({record.name}) stops at once: its "
                                 f"open connections end and it cannot sign in again. This "
                                 f"cannot be undone; you can create a new one.",
                            action=f"/app-passwords/{quote(id)}/delete",
                            button="Delete it", cancel="/")

    @page("/app-passwords/<string:id>/delete", "POST")
    async def delete(self, request: Any, id: str) -> bytes:
        session, account = await self._signed_in(request, form=True)
        if not self.config.policy.allow_user_app_passwords:
            raise Forbidden(MANAGED)
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
