"""The help desk's pages, for members of ``directory.admin_group``: find a
user (by part of a name, or among those locked out), see what a help desk
needs when they call (account, MFA state as it takes effect, lockout, app
passwords, recent refused sign-ins), and act for them, each action
confirmed first and audited with ``actor: portal:NAME``.

Making an app password for a user shows its secret to the help desk, who
could then read and send that user's mail: it is offered only where the
operator allows it (``portal.help_desk_app_passwords``), and the user is told
every time, by mail and on their own page."""

from __future__ import annotations

from typing import Any

from proxy import apppasswords
from proxy.admin import AdminError
from proxy.directory import Account, DirectoryUnavailable
from proxy.portal import notify
from proxy.portal.making import CannotCreate, Maker, Shown
from proxy.portal.pages import (TRY_LATER, BadRequest, Context, Forbidden, Pages, Unavailable,
                                page, quote)
from proxy.portal.words import mfa_in_effect, quoted
from proxy.store import AppPassword, MfaState, Passkey, StoreError
from proxy.threads import Busy

FOUND_AT_MOST = 20  # names a search lists
LOCKED_LISTED = 50
NO_CREATING = ("The help desk does not create app passwords here: users create their own, or "
               "an operator does on the command line.")

ACTIONS = {
    "revoke-all": ("Delete all app passwords of {user}?",
                   "Every device of {user} that uses an app password stops at once. They "
                   "can create new ones (where self-service is on), or you can.",
                   "Delete them all"),
    "reset-second-factor": ("Reset the authenticator of {user}?",
                            "{user} sets up an authenticator app again at their next "
                            "sign-in to this portal (for a lost or replaced phone).",
                            "Reset it"),
    "reset-passkeys": ("Remove every passkey of {user}?",
                       "{user} can no longer sign in to this portal with any of their passkeys "
                       "(for a lost key or phone); they sign in with their authenticator app, "
                       "and can set up passkeys again.",
                       "Remove them"),
    "unlock": ("Lift the lockout of {user}?",
               "Failed sign-ins of {user} are forgotten on every node; they can try again "
               "at once.", "Lift it"),
}


class HelpDesk(Pages):
    def __init__(self, context: Context, maker: Maker) -> None:
        super().__init__(context)
        self._maker = maker

    @page("/helpdesk", "GET")
    async def help_desk(self, request: Any) -> bytes:
        """The search: a name or mail address as the user signs in goes
        straight to their page; part of one lists the names that contain
        it. Below, the accounts locked out now."""
        session, _ = await self._signed_in(request, help_desk=True)
        wanted = self._field(request, "user", required=False).strip()
        error, found = None, []
        if wanted:
            try:
                account = await self._auth.account(wanted)
                if account is not None:
                    return self._redirect(request, "/helpdesk/users/" + quote(account.username))
                found = await self._auth.find_names(wanted, FOUND_AT_MOST)
            except DirectoryUnavailable:
                error = "The directory does not answer just now; try again."
            if len(found) == 1:
                return self._redirect(request, "/helpdesk/users/" + quote(found[0]))
            if not found and error is None:
                error = f"No user name contains {quoted(wanted)}. Check the spelling, or " \
                        f"search by mail address."
        locked = self._auth.locked_out()[:LOCKED_LISTED]
        notice, session.notice = session.notice, None
        return self._render(request, "helpdesk.html", 404 if error else 200, session=session,
                            wanted=wanted, error=error, notice=notice, found=found,
                            more=len(found) >= FOUND_AT_MOST, locked=locked)

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
            session.notice = f"No user named {quoted(name)} in the directory (or it does not answer)."
            return self._redirect(request, "/helpdesk")
        admin = self._admin(f"portal:{session.username}")

        def read() -> tuple[Any, list[AppPassword], bool, list[Passkey]]:
            return admin.user(subject.username), admin.list(subject.username), \
                admin.has_second_factor(subject.username), admin.passkeys(subject.username)

        try:
            user, records, enrolled, passkeys = await self._on_store(read)
        except (StoreError, Busy):
            raise Unavailable("The app-password store does not answer just now.",
                              session=session) from None
        refusals = await self._refusals(subject.username)
        notice, session.notice = session.notice, None
        return self._render(
            request, "helpdesk_user.html", session=session, subject=subject, user=user,
            rows=self._rows(records), enrolled=enrolled, locked=self._auth.locked(subject),
            refusals=refusals, notice=notice, states=[s.value for s in MfaState],
            mfa=mfa_in_effect(subject, user.mfa_state), quoted=quote(subject.username),
            may_create=self.config.portal.help_desk_app_passwords, passkeys=passkeys,
        )

    @page("/helpdesk/users/<string:name>/<string:action>", "GET")
    async def help_desk_confirm(self, request: Any, name: str, action: str) -> bytes:
        session, _ = await self._signed_in(request, help_desk=True)
        back = f"/helpdesk/users/{quote(name)}"
        if action == "mfa":
            return await self._confirm_mfa(request, session, name, back)
        if action not in ACTIONS:
            return self._redirect(request, "/helpdesk")
        heading, text, button = ACTIONS[action]
        return self._render(request, "confirm.html", session=session,
                            heading=heading.format(user=name), text=text.format(user=name),
                            action=f"{back}/{action}", button=button, cancel=back, fields={})

    async def _confirm_mfa(self, request: Any, session: Any, name: str, back: str) -> bytes:
        """Setting the MFA state is confirmed like every other action, saying
        what will be in effect (a directory group may enforce it anyway)."""
        try:
            state = MfaState(self._field(request, "state"))
        except ValueError:
            raise BadRequest(session=session) from None
        subject = await self._subject(name)
        if subject is None:
            return self._redirect(request, "/helpdesk")
        after = mfa_in_effect(subject, state)
        text = f"In effect it will be {after.text}: {after.consequence}."
        if state is MfaState.DISABLED:
            text += " Being disabled also forgets when they registered."
        return self._render(request, "confirm.html", session=session,
                            heading=f"Set the MFA state of {name} to {state.value}?", text=text,
                            action=f"{back}/mfa", button=f"Set it to {state.value}", cancel=back,
                            fields={"state": state.value})

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
            elif action == "reset-passkeys":
                gone = await self._on_store(admin.reset_passkeys, user)
                self.sessions.end_user(user)
                await self._tell(subject.dn, self._address(request), notify.notify_passkey,
                                 kind=notify.PASSKEYS_RESET, by=session.username)
                session.notice = f"Removed {gone} passkeys of {user}; they were told by mail."
            elif action == "unlock":
                await self._on_store(admin.unlock, user)
                session.notice = f"Lifted the lockout of {user}."
            elif action == "mfa":
                try:
                    state = MfaState(self._field(request, "state"))
                except ValueError:
                    raise BadRequest() from None
                await self._on_store(admin.set_mfa, user, state)
                after = mfa_in_effect(subject, state)
                session.notice = f"The MFA state of {user} is set to {state.value}." + (
                    f" In effect it stays {after.effective}: a directory group enforces it."
                    if after.hidden else "")
            else:
                return self._redirect(request, "/helpdesk")
        except (AdminError, StoreError, Busy) as e:
            session.notice = f"That did not work: {e}" if str(e) else TRY_LATER
        await self._refresh()
        return self._redirect(request, f"/helpdesk/users/{quote(user)}")

    @page("/helpdesk/users/<string:name>/app-passwords", "POST")
    async def help_desk_create(self, request: Any, name: str) -> bytes:
        """The help desk makes an app password for a user (where users may
        not, or for one who cannot), where the operator allows it: shown
        once, to the help desk; the user told by mail and on their page,
        and the showing audited."""
        session, _ = await self._signed_in(request, help_desk=True, form=True)
        if not self.config.portal.help_desk_app_passwords:
            raise Forbidden(NO_CREATING, session=session)
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
        address = self._address(request)
        self._record("app_password_shown_to_help_desk", user=subject.username,
                     app_password_id=made.record.id, app_password_name=made.record.name,
                     actor=f"portal:{session.username}", client_address=address)
        self._maker.notify(subject, made.record.name, address, f"portal:{session.username}",
                           always=True)
        session.shown = Shown(made.record, apppasswords.display(made.secret), subject.username)
        return self._redirect(request, "/app-passwords/new")

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
