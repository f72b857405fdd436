"""Signing in to the portal: the password through the authentication core
(protocol ``portal``, as a primary password on an on-premises listener),
then a TOTP code, or setting up an authenticator app the first time; and
signing out. A new session token at each stage."""

from __future__ import annotations

import secrets
from typing import Any

import segno
from twisted.logger import Logger

from proxy import secondfactor
from proxy.admin import AdminError
from proxy.auth import Attempt, Outcome
from proxy.portal.pages import TRY_LATER, BadRequest, Context, Pages, SignInNeeded, page
from proxy.portal.websessions import COOKIE, CSRF_COOKIE, WebSession, same
from proxy.store import StoreError
from proxy.threads import Busy

log = Logger(namespace="legacy_auth_proxy.portal")

SIGN_IN_FAILED = ("The user name, password or code is not right. Check them and try again; "
                  "after several wrong tries, signing in pauses for a while.")


class SignIn(Pages):
    def __init__(self, context: Context, keybox: secondfactor.KeyBox) -> None:
        super().__init__(context)
        self._keybox = keybox

    @page("/sign-in", "GET")
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

    @page("/sign-in", "POST")
    async def sign_in(self, request: Any) -> bytes:
        cookie = (request.getCookie(CSRF_COOKIE.encode()) or b"").decode("latin-1")
        username = self._field(request, "username", required=False).strip()
        password = self._field(request, "password", required=False)
        code = self._field(request, "code", required=False).strip()
        csrf = self._field(request, "csrf")
        if not cookie or not same(csrf, cookie) or not self._same_origin(request):
            raise BadRequest()
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
        with self._auth.throttle.alone(account.key) as alone:
            if not alone:
                # One code check at a time per account: codes are not guessed in parallel.
                return self._sign_in_form(request, 401, SIGN_IN_FAILED, username)
            return await self._second_factor(request, attempt, decision, username, code, started)

    async def _second_factor(self, request: Any, attempt: Any, decision: Any, username: str,
                             code: str, started: float) -> bytes:
        account = decision.account
        address = attempt.client_address
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
                # Held by the core as a wrong password is, from when the
                # attempt began: a wrong code takes no longer to be told.
                await self._auth.second_factor_failed(attempt, decision, code or "-", started)
                return self._sign_in_form(request, 401, SIGN_IN_FAILED, username)
        except (StoreError, Busy, secondfactor.SealError) as e:
            log.error("portal sign-in of {user}: {error}", user=account.username, error=str(e))
            return self._sign_in_form(request, 503, TRY_LATER, username)
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

    def _enrolling(self, request: Any) -> tuple[str | None, WebSession]:
        """The session setting up an authenticator app, and its token; or SignInNeeded."""
        token = self._token(request)
        session = self.sessions.get(token)
        if session is None or session.stage != "enrolling" or session.pending_key is None:
            raise SignInNeeded()
        return token, session

    @page("/enrol", "GET")
    def enrol_page(self, request: Any) -> bytes:
        _, session = self._enrolling(request)
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

    @page("/enrol", "POST")
    async def enrol(self, request: Any) -> bytes:
        token, session = self._enrolling(request)
        assert session.pending_key is not None
        self._check_form(request, session)
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
        await self._tell_second_factor(session.dn, self._address(request))  # by mail
        self.sessions.end(token)
        self.sessions.end_user(session.username, stage="enrolling")
        token, fresh = self.sessions.start(session.username, session.dn, "signed_in",
                                           started=session.started)
        fresh.notice = "Your authenticator app is set up. You will be asked for a code at every sign-in."
        self._set_cookie(request, COOKIE, token)
        self._record("portal_sign_in", user=session.username,
                     client_address=self._address(request), outcome="accepted")
        return self._redirect(request, "/")

    @page("/sign-out", "POST")
    def sign_out(self, request: Any) -> bytes:
        # Whatever the form says: signing out can only ever help its user.
        self.sessions.end(self._token(request))
        self._set_cookie(request, COOKIE, "", max_age=0)
        return self._redirect(request, "/sign-in")
