"""Signing in to the portal: the password through the authentication core
(protocol ``portal``, as a primary password on an on-premises listener),
then a TOTP code, or setting up an authenticator app the first time; or,
with ``portal.oidc``, at the organisation's identity provider
(:mod:`proxy.portal.oidc`), the name it gives looked up in the directory,
which stays the authority on the account. Signing out. A new session token
at each stage.

The fresh check (``/confirm-it-is-you``) is here too: an action that needs
a recent proof of who the user is (:class:`~proxy.portal.pages.FreshCheckNeeded`)
sends them to a new code, or to a new sign-in at the provider
(``prompt=login``, ``max_age``, its ``auth_time`` checked), and back."""

from __future__ import annotations

import secrets
from typing import Any

import segno
from twisted.logger import Logger

from proxy import secondfactor
from proxy.admin import AdminError
from proxy.auth import Attempt, Decision, Outcome, Reason
from proxy.webclient import agent
from proxy.config import ConfigError
from proxy.directory import DirectoryUnavailable
from proxy.portal import notify
from proxy.portal.oidc import Identity, OidcClient, ProviderError, Refused
from proxy.portal.pages import (
    TRY_LATER, BadRequest, Context, Pages, SignInNeeded, local_path, page)
from proxy.portal.websessions import COOKIE, CSRF_COOKIE, WebSession, fresh, same
from proxy.store import StoreError
from proxy.threads import Busy

log = Logger(namespace="legacy_auth_proxy.portal")

SIGN_IN_FAILED = ("The user name, password or code is not right. Check them and try again; "
                  "after several wrong tries, signing in pauses for a while.")
OIDC_COOKIE = "__Host-portal-oidc"  # ties a sign-in at the provider to the browser that began it
PROVIDER_REFUSED = ("Signing in through {provider} did not work. Try again; if it goes on "
                    "failing, ask the help desk.")
NOT_HERE = ("Your account cannot use this page. If you think it should, ask the help desk.")
CODE_WRONG = "That code is not right. Enter the 6 digits your app shows now."


def span(seconds: float) -> str:
    """``portal.fresh_check`` in words: "5 minutes", "1 minute", "30 seconds"."""
    if seconds < 60 or seconds % 60:
        return f"{seconds:g} seconds"
    minutes = int(seconds // 60)
    return "1 minute" if minutes == 1 else f"{minutes} minutes"


def oidc_client(context: Context) -> OidcClient | None:
    """The provider's client, when ``portal.oidc`` is set: its secret and
    CA read now, at start."""
    config = context.config()
    settings = config.portal.oidc
    if settings is None:
        return None
    try:
        secret = settings.client_secret_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(config.source, None, "portal.oidc.client_secret_file",
                          f"cannot read {settings.client_secret_file}: "
                          f"{getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
    if not secret:
        raise ConfigError(config.source, None, "portal.oidc.client_secret_file",
                          f"{settings.client_secret_file} is empty")
    ca = None
    if settings.ca_file is not None:
        try:
            ca = settings.ca_file.read_bytes()
        except OSError as e:
            raise ConfigError(config.source, None, "portal.oidc.ca_file",
                              f"cannot read {settings.ca_file}: {e.strerror}") from None
    return OidcClient(context.reactor, settings, secret, agent(context.reactor, ca, settings.timeout))


class SignIn(Pages):
    def __init__(self, context: Context, keybox: secondfactor.KeyBox,
                 oidc: OidcClient | None = None, passkeys: Any = None) -> None:
        super().__init__(context)
        self._keybox = keybox
        self._oidc = oidc if oidc is not None else oidc_client(context)
        # proxy.portal.passkeys.Passkeys, when portal.passkeys_origin is set
        self._passkeys = passkeys if passkeys is not None and passkeys.enabled else None

    @page("/sign-in", "GET")
    def sign_in_page(self, request: Any) -> bytes:
        if (session := self.sessions.get(self._token(request))) and session.stage == "signed_in":
            return self._redirect(request, "/")
        return self._sign_in_form(request)

    def _sign_in_form(self, request: Any, status: int = 200, error: str | None = None,
                      username: str = "") -> bytes:
        if self._oidc is not None:
            return self._render(request, "sign_in.html", status, csrf="", error=error,
                                username="", session=None,
                                provider=self._oidc.config.provider_name)
        csrf = secrets.token_urlsafe(32)
        self._set_cookie(request, CSRF_COOKIE, csrf)
        return self._render(request, "sign_in.html", status, csrf=csrf, error=error,
                            username=username, session=None, provider=None)

    @page("/sign-in", "POST")
    async def sign_in(self, request: Any) -> bytes:
        cookie = (request.getCookie(CSRF_COOKIE.encode()) or b"").decode("latin-1")
        username = self._field(request, "username", required=False).strip()
        password = self._field(request, "password", required=False)
        code = self._field(request, "code", required=False).strip()
        csrf = self._field(request, "csrf")
        if not cookie or not same(csrf, cookie) or not self._same_origin(request):
            raise BadRequest()
        if self._oidc is not None:
            # Signing in is the provider's: no password is taken here.
            return self._sign_in_form(request, 400)
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
            if not code and await self._has_passkeys(account.username):
                # No code typed, and passkeys to use: one of them next.
                return self._passkeys.begin_sign_in(request, attempt, decision, started)
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

    async def _has_passkeys(self, username: str) -> bool:
        if self._passkeys is None:
            return False
        return bool(await self._on_store(self._admin("portal").passkeys, username))

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
        await self._tell(session.dn, self._address(request), notify.notify_second_factor)  # by mail
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

    # -- the identity provider ------------------------------------------------------------

    def _redirect_uri(self, request: Any) -> str:
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if not host or any(c in host for c in "/?#@\\ "):
            raise BadRequest()
        return f"https://{host}/oidc/callback"

    def _provider_words(self, text: str) -> str:
        assert self._oidc is not None
        return text.format(provider=self._oidc.config.provider_name)

    async def _to_provider(self, request: Any, **kwargs: Any) -> bytes:
        """To the provider's authorization endpoint, the browser bound to
        this sign-in by a cookie of its own (SameSite=Lax: it comes back
        from the provider's site)."""
        assert self._oidc is not None
        binding = secrets.token_urlsafe(32)
        url = await self._oidc.begin(self._redirect_uri(request), binding, **kwargs)
        request.addCookie(OIDC_COOKIE.encode(), binding.encode(), path=b"/", secure=True,
                          httpOnly=True, sameSite="lax", max_age=b"600")
        return self._redirect(request, url)

    @page("/sign-in/oidc", "GET")
    async def sign_in_oidc(self, request: Any) -> bytes:
        if self._oidc is None:
            return self._redirect(request, "/sign-in")
        try:
            return await self._to_provider(request)
        except ProviderError as e:
            log.error("portal sign-in: the identity provider: {error}", error=str(e))
            return self._sign_in_form(request, 503, TRY_LATER)

    def _continue(self, request: Any, to: str) -> bytes:
        """Onward to ``to`` by a page of this site: a redirect straight from
        the provider's callback would still be the provider's navigation,
        and the session cookie (SameSite=Strict) would not go with it."""
        request.setHeader(b"Cache-Control", b"no-store")
        return self._render(request, "continue.html", to=local_path(to))

    @page("/oidc/callback", "GET")
    async def oidc_callback(self, request: Any) -> bytes:
        if self._oidc is None:
            return self._redirect(request, "/sign-in")
        binding = request.getCookie(OIDC_COOKIE.encode())
        request.addCookie(OIDC_COOKIE.encode(), b"", path=b"/", secure=True, httpOnly=True,
                          sameSite="lax", max_age=b"0")
        state = self._field(request, "state", required=False)
        pending = self._oidc.pendings.take(state, binding.decode("latin-1") if binding else None)
        address = self._address(request)
        if pending is None:
            return self._sign_in_form(request, 400, "That sign-in was started too long ago or in "
                                      "another browser. Sign in again.")
        error = self._field(request, "error", required=False)
        code = self._field(request, "code", required=False)
        event = "portal_fresh_check" if pending.purpose == "fresh" else "portal_sign_in"
        if error or not code:
            self._record(event, user=pending.username, client_address=address,
                         outcome="refused", method="oidc", reason=f"provider_{error[:40] or 'no_code'}")
            return self._after_provider_failed(request, pending)
        try:
            identity = await self._oidc.finish(pending, code, self._redirect_uri(request))
        except ProviderError as e:
            log.error("portal sign-in: the identity provider: {error}", error=str(e))
            return self._sign_in_form(request, 503, TRY_LATER)
        except Refused as e:
            self._record(event, user=pending.username, client_address=address,
                         outcome="refused", method="oidc", reason=e.reason)
            return self._after_provider_failed(request, pending)
        try:
            account = await self._auth.account(identity.name)
        except DirectoryUnavailable:
            return self._sign_in_form(request, 503, TRY_LATER)
        refusal = None
        if account is None:
            refusal = Reason.UNKNOWN_USER.value
        elif not account.active:
            refusal = Reason.ACCOUNT_INACTIVE.value
        elif self._auth.locked(account) > 0:
            refusal = Reason.LOCKED_OUT.value
        if refusal is not None or account is None:
            self._record(event, user=account.username if account else identity.name,
                         client_address=address, outcome="refused", method="oidc", reason=refusal)
            return self._sign_in_form(request, 403, NOT_HERE)
        if pending.purpose == "fresh":
            return self._fresh_from_provider(request, pending, identity, account.username)
        token, _ = self.sessions.start(account.username, account.dn, "signed_in", method="oidc",
                                       strong_at=identity.auth_time)
        self._set_cookie(request, COOKIE, token)
        self._record("portal_sign_in", user=account.username, client_address=address,
                     outcome="accepted", method="oidc", acr=identity.acr,
                     amr=list(identity.amr) or None)
        return self._continue(request, pending.next)

    def _after_provider_failed(self, request: Any, pending: Any) -> bytes:
        if pending.purpose == "fresh":
            return self._render(request, "error.html", 401, heading="Not confirmed",
                                text=self._provider_words(PROVIDER_REFUSED))
        return self._sign_in_form(request, 401, self._provider_words(PROVIDER_REFUSED))

    def _fresh_from_provider(self, request: Any, pending: Any, identity: Identity,
                             username: str) -> bytes:
        address = self._address(request)
        session = None
        if username == pending.username:
            session = self.sessions.proved(pending.session, username, identity.auth_time)
        if session is None:
            # Another user signed in at the provider, or the page session ended meanwhile.
            self._record("portal_fresh_check", user=pending.username, client_address=address,
                         outcome="refused", method="oidc",
                         reason="another_user" if username != pending.username else "no_session")
            raise SignInNeeded()
        self._record("portal_fresh_check", user=username, client_address=address,
                     outcome="accepted", method="oidc", acr=identity.acr,
                     amr=list(identity.amr) or None)
        session.notice = "Confirmed. Now do it again: it will go through."
        return self._continue(request, pending.next)

    # -- the fresh check --------------------------------------------------------------------

    @page("/confirm-it-is-you", "GET")
    async def confirm_page(self, request: Any) -> bytes:
        session, _ = await self._signed_in(request)
        back = local_path(self._field(request, "next", required=False))
        if fresh(session, self._reactor.seconds(), self.config.portal.fresh_check):
            return self._redirect(request, back)
        if self._oidc is not None and session.method == "oidc":
            return self._render(request, "confirm_it_is_you.html", session=session, back=back,
                                provider=self._oidc.config.provider_name,
                                span=span(self.config.portal.fresh_check))
        return await self._confirm_form(request, session, back)

    @page("/confirm-it-is-you/oidc", "GET")
    async def confirm_at_provider(self, request: Any) -> bytes:
        """A new sign-in at the provider (prompt=login, max_age), then back."""
        session, _ = await self._signed_in(request)
        back = local_path(self._field(request, "next", required=False))
        if self._oidc is not None and session.method == "oidc":
            try:
                return await self._to_provider(
                    request, purpose="fresh", next=back, username=session.username,
                    session=self.sessions.key_of(self._token(request)),
                    max_age=int(self.config.portal.fresh_check))
            except ProviderError as e:
                log.error("portal fresh check: the identity provider: {error}", error=str(e))
                return self._render(request, "error.html", 503, heading="Try again in a minute",
                                    text=TRY_LATER, session=session)
        return await self._confirm_form(request, session, back)

    async def _confirm_form(self, request: Any, session: WebSession, back: str,
                            status: int = 200, error: str | None = None) -> bytes:
        try:
            passkeys = await self._has_passkeys(session.username)
        except (StoreError, Busy):
            passkeys = False
        return self._render(request, "confirm_it_is_you.html", status, session=session,
                            back=back, error=error, provider=None, passkeys=passkeys,
                            span=span(self.config.portal.fresh_check))

    @page("/confirm-it-is-you", "POST")
    async def confirm(self, request: Any) -> bytes:
        session, account = await self._signed_in(request, form=True)
        back = local_path(self._field(request, "next", required=False))
        code = self._field(request, "code", required=False).strip()
        address = self._address(request)
        started = self._reactor.seconds()
        attempt = Attempt(protocol="portal", realm="on-premises", username=session.username,
                          secret="", client_address=address, tls=True, legacy=False,
                          second_factor=True)
        decision = Decision(Reason.PRIMARY, account.username, account, checked=True)
        with self._auth.throttle.alone(account.key) as alone:
            if not alone or self._auth.locked(account, address) > 0:
                return await self._confirm_form(request, session, back, 401, CODE_WRONG)
            try:
                key = await self._on_store(self._load_key, account.username)
                step = None if key is None else secondfactor.matching_step(
                    key, code, self._reactor.seconds())
                taken = step is not None and await self._on_store(
                    self._take_step, account.username, step)
            except (StoreError, Busy, secondfactor.SealError) as e:
                log.error("portal fresh check of {user}: {error}", user=account.username,
                          error=str(e))
                return await self._confirm_form(request, session, back, 503, TRY_LATER)
            if not taken:
                await self._auth.second_factor_failed(attempt, decision, code or "-", started)
                self._record("portal_fresh_check", user=account.username, client_address=address,
                             outcome="refused", method="totp", reason=Reason.WRONG_CODE.value)
                return await self._confirm_form(request, session, back, 401, CODE_WRONG)
        self._auth.throttle.succeeded(account.key, address)
        session.strong_at = self._reactor.seconds()
        self._record("portal_fresh_check", user=account.username, client_address=address,
                     outcome="accepted", method="totp")
        session.notice = "Confirmed. Now do it again: it will go through."
        return self._redirect(request, back)
