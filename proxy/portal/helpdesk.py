"""The help desk's pages, for members of ``directory.admin_group``: find a
user, see what a help desk needs when they call (account, MFA state,
lockout, app passwords, recent refused sign-ins), and act for them, each
action confirmed first and audited with ``actor: portal:NAME``."""

from __future__ import annotations

from typing import Any

from proxy import apppasswords
from proxy.admin import AdminError
from proxy.audit import recent_events
from proxy.directory import Account, DirectoryUnavailable
from proxy.portal.making import CannotCreate, Maker
from proxy.portal.pages import TRY_LATER, BadRequest, Context, Pages, Unavailable, page, quote
from proxy.store import AppPassword, MfaState, StoreError
from proxy.threads import Busy

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


class HelpDesk(Pages):
    def __init__(self, context: Context, maker: Maker, files_pool: Any) -> None:
        super().__init__(context)
        self._maker = maker
        self._files_pool = files_pool

    @page("/helpdesk", "GET")
    async def help_desk(self, request: Any) -> bytes:
        session, _ = await self._signed_in(request, help_desk=True)
        wanted = self._field(request, "user", required=False).strip()
        error = None
        if wanted:
            try:
                account = await self._auth.account(wanted)
            except DirectoryUnavailable:
                account, error = None, "The directory does not answer just now; try again."
            if account is not None:
                return self._redirect(request, "/helpdesk/users/" + quote(account.username))
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

    @page("/helpdesk/users/<string:name>", "GET")
    async def help_desk_user(self, request: Any, name: str) -> bytes:
        session, _ = await self._signed_in(request, help_desk=True)
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
            raise Unavailable("The app-password store does not answer just now.",
                              session=session) from None
        refusals = await self._refusals(subject.username)
        notice, session.notice = session.notice, None
        return self._render(
            request, "helpdesk_user.html", session=session, subject=subject, user=user,
            rows=self._rows(records), enrolled=enrolled, locked=self._auth.locked(subject),
            refusals=refusals, notice=notice, states=[s.value for s in MfaState],
            words=REFUSAL_WORDS, quoted=quote(subject.username),
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

    @page("/helpdesk/users/<string:name>/<string:action>", "GET")
    async def help_desk_confirm(self, request: Any, name: str, action: str) -> bytes:
        session, _ = await self._signed_in(request, help_desk=True)
        if action not in ACTIONS:
            return self._redirect(request, "/helpdesk")
        heading, text, button = ACTIONS[action]
        return self._render(request, "confirm.html", session=session,
                            heading=heading.format(user=name), text=text.format(user=name),
                            action=f"/helpdesk/users/{quote(name)}/{action}", button=button,
                            cancel=f"/helpdesk/users/{quote(name)}")

    @page("/helpdesk/users/<string:name>/<string:action>", "POST")
    async def help_desk_act(self, request: Any, name: str, action: str) -> bytes:
        session, _ = await self._signed_in(request, help_desk=True, form=True)
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
                try:
                    state = MfaState(self._field(request, "state"))
                except ValueError:
                    raise BadRequest() from None
                await self._on_store(admin.set_mfa, user, state)
                session.notice = f"The MFA state of {user} is now {state.value}."
            else:
                return self._redirect(request, "/helpdesk")
        except (AdminError, StoreError, Busy) as e:
            session.notice = f"That did not work: {e}" if str(e) else TRY_LATER
        await self._refresh()
        return self._redirect(request, f"/helpdesk/users/{quote(user)}")

    @page("/helpdesk/users/<string:name>/app-passwords", "POST")
    async def help_desk_create(self, request: Any, name: str) -> bytes:
        """The help desk makes an app password for a user (where users may
        not, or for one who cannot): shown once, to the help desk."""
        session, _ = await self._signed_in(request, help_desk=True, form=True)
        subject = await self._subject(name)
        if subject is None:
            return self._redirect(request, "/helpdesk")
        device = self._field(request, "name", required=False).strip()
        try:
            wanted = self._maker.wanted(
                device, self._field(request, "expires", required=False).strip(),
                self._fields(request, "protocols"), self._field(request, "networks", required=False))
            made = await self._maker.make(session.username, subject.username, wanted)
        except CannotCreate as e:
            session.notice = e.text
            return self._redirect(request, f"/helpdesk/users/{quote(subject.username)}")
        self._maker.notify(subject, made.record.name, self._address(request),
                           f"portal:{session.username}")
        return self._render(request, "created.html", 201, session=session, record=made.record,
                            secret=apppasswords.display(made.secret), owner=subject.username,
                            row=self._rows([made.record])[0])

    @page("/helpdesk/users/<string:name>/app-passwords/<string:id>/delete", "GET")
    async def help_desk_delete_page(self, request: Any, name: str, id: str) -> bytes:
        session, _ = await self._signed_in(request, help_desk=True)
        record = await self._own(name, id)
        if record is None:
            return self._redirect(request, f"/helpdesk/users/{quote(name)}")
        return self._render(request, "confirm.html", session=session,
                            heading=f"Delete the app password “{record.name}” of {name}?",
                            text="The device that uses it stops at once: its open connections "
                                 "end and it cannot sign in again.",
                            action=f"/helpdesk/users/{quote(name)}/app-passwords/{quote(id)}/delete",
                            button="Delete it", cancel=f"/helpdesk/users/{quote(name)}")

    @page("/helpdesk/users/<string:name>/app-passwords/<string:id>/delete", "POST")
    async def help_desk_delete(self, request: Any, name: str, id: str) -> bytes:
        session, _ = await self._signed_in(request, help_desk=True, form=True)
        record = await self._own(name, id)
        if record is not None:
            try:
                await self._on_store(self._admin(f"portal:{session.username}").delete, name, id)
                session.notice = f"Deleted the app password “{record.name}” of {name}."
            except (AdminError, StoreError, Busy):
                session.notice = TRY_LATER
            await self._refresh()
        return self._redirect(request, f"/helpdesk/users/{quote(name)}")
