"""Passkeys (WebAuthn) as the portal's own second factor, beside TOTP, with
Yubico's ``fido2`` as the relying party: a user registers several (from
the security-info page, after a fresh check), names them and removes them;
signs in with their directory password and then one of them; passes the
fresh check with one. The help desk resets them (:mod:`~proxy.portal.helpdesk`).

Passkeys are bound to ``portal.passkeys_origin``: its host name is the
relying party id, and an answer signed for any other origin is refused.
Without it, nothing here is offered.

A passkey is the second step after the password, not a sign-in of its own:
the directory stays the authority on the password, and a passkey used
where an account's password was changed or disabled still lets no one in.

The browser's part is ``static/passkeys.js``: the options are in the page
(a ``data-`` attribute, no inline script under the portal's CSP), and the
authenticator's answer goes back in an ordinary form field. The challenge
is held in the page session (:attr:`WebSession.ceremony`), used once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import urllib.parse
from typing import Any

import attrs
from fido2.server import Fido2Server
from fido2.webauthn import (
    AttestedCredentialData,
    AuthenticationResponse,
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialUserEntity,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)
from twisted.logger import Logger

from proxy.admin import AdminError
from proxy.auth import Attempt, Decision
from proxy.portal import notify
from proxy.portal.pages import (
    TRY_LATER, BadRequest, Context, Pages, SignInNeeded, Unavailable, local_path, page, quote)
from proxy.portal.websessions import COOKIE, WebSession
from proxy.store import Passkey, StoreError
from proxy.threads import Busy

log = Logger(namespace="legacy_auth_proxy.portal")

NOT_VERIFIED = "That passkey did not answer as it should. Try again, or use your authenticator app."
MAX_ANSWER = 16 * 1024  # an authenticator's answer is a few hundred bytes


@attrs.frozen
class Ceremony:
    """A passkey ceremony under way: what it is for, the fido2 state
    (its challenge), and at sign-in the attempt the password began."""

    purpose: str  # "register", "sign_in" or "fresh"
    state: Any = attrs.field(repr=False)
    attempt: Any = None
    decision: Any = None
    started: float = 0.0


def credential_id(text: str) -> bytes | None:
    """A passkey's id as a URL or a form names it (base64url), or None."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def relying_party(origin: str, title: str) -> PublicKeyCredentialRpEntity:
    """The relying party: ``portal.passkeys_origin``'s host name, the title."""
    host = urllib.parse.urlsplit(origin).hostname
    assert host
    return PublicKeyCredentialRpEntity(name=title, id=host)


def user_handle(username: str) -> bytes:
    """The WebAuthn user handle: stable for a user, and not their name."""
    return hashlib.sha256(b"legacy-auth-proxy passkey\0" + username.encode()).digest()


class Passkeys(Pages):
    def __init__(self, context: Context) -> None:
        super().__init__(context)
        portal = self.config.portal
        self._origin = None
        self._server = None
        if portal.passkeys_origin is not None:
            parts = urllib.parse.urlsplit(portal.passkeys_origin)
            self._origin = f"{parts.scheme}://{parts.netloc}".lower()
            self._server = Fido2Server(relying_party(portal.passkeys_origin, portal.title),
                                       verify_origin=lambda origin: origin.lower() == self._origin)

    @property
    def enabled(self) -> bool:
        return self._server is not None

    def _fido(self) -> Fido2Server:
        if self._server is None:
            raise SignInNeeded()  # no passkeys here: to the usual pages
        return self._server

    def _answer(self, request: Any) -> dict[str, Any]:
        """The authenticator's answer, as passkeys.js put it in the form."""
        text = self._field(request, "response", required=False)
        if not text or len(text) > MAX_ANSWER:
            raise BadRequest()
        try:
            answer = json.loads(text)
        except ValueError:
            raise BadRequest() from None
        if not isinstance(answer, dict):
            raise BadRequest()
        return answer

    def _stored(self, username: str) -> list[Passkey]:
        return self._admin("portal").passkeys(username)

    def _ceremony(self, session: WebSession, purpose: str) -> Ceremony:
        """The session's ceremony for ``purpose``, taken: a challenge is answered once."""
        ceremony, session.ceremony = session.ceremony, None
        if not isinstance(ceremony, Ceremony) or ceremony.purpose != purpose:
            raise BadRequest(session=session if session.stage == "signed_in" else None)
        return ceremony

    async def _assertion_options(self, session: WebSession, purpose: str,
                                 **kwargs: Any) -> tuple[str, list[Passkey]]:
        passkeys = await self._on_store(self._stored, session.username)
        options, state = self._fido().authenticate_begin(
            [AttestedCredentialData(p.credential) for p in passkeys],
            user_verification=UserVerificationRequirement.PREFERRED)
        session.ceremony = Ceremony(purpose, state, **kwargs)
        return json.dumps(dict(options)), passkeys

    async def _verify(self, session: WebSession, ceremony: Ceremony,
                      answer: dict[str, Any]) -> Passkey | None:
        """The passkey that signed the answer, its counter moved on; None for
        an answer that does not verify, or a counter that went back (a clone)."""
        passkeys = await self._on_store(self._stored, session.username)
        try:
            response = AuthenticationResponse.from_dict(answer)
            self._fido().authenticate_complete(
                ceremony.state, [AttestedCredentialData(p.credential) for p in passkeys], response)
        except Exception as e:  # fido2 raises ValueError, KeyError, TypeError, InvalidSignature
            log.info("passkey of {user} refused: {error}", user=session.username,
                     error=type(e).__name__)
            return None
        used = next((p for p in passkeys if p.credential_id == response.raw_id), None)
        if used is None:
            return None
        counter = response.response.authenticator_data.counter
        if not await self._on_store(self._admin("portal").use_passkey, session.username,
                                    used.credential_id, counter):
            log.warn("passkey {name} of {user}: its counter went back ({seen} after {stored}): "
                     "refused as a possible clone", name=used.name, user=session.username,
                     seen=counter, stored=used.sign_count)
            return None
        return used

    # -- registering, naming, removing ---------------------------------------------------

    @page("/passkeys/new", "GET")
    async def new_page(self, request: Any) -> bytes:
        # A new way to sign in needs a recent proof of who the user is.
        session, account = await self._signed_in(request, fresh=True)
        return await self._new_form(request, session)

    async def _new_form(self, request: Any, session: WebSession, status: int = 200,
                        error: str | None = None, name: str = "") -> bytes:
        try:
            passkeys = await self._on_store(self._stored, session.username)
        except (StoreError, Busy):
            raise Unavailable("The store does not answer just now.", session=session) from None
        options, state = self._fido().register_begin(
            PublicKeyCredentialUserEntity(name=session.username, id=user_handle(session.username),
                                          display_name=session.username),
            [AttestedCredentialData(p.credential) for p in passkeys],
            resident_key_requirement=ResidentKeyRequirement.DISCOURAGED,
            user_verification=UserVerificationRequirement.PREFERRED)
        session.ceremony = Ceremony("register", state)
        return self._render(request, "passkey_new.html", status, session=session, error=error,
                            options=json.dumps(dict(options)), name=name, count=len(passkeys))

    @page("/passkeys/new", "POST")
    async def register(self, request: Any) -> bytes:
        session, account = await self._signed_in(request, form=True, fresh=True)
        name = self._field(request, "name", required=False).strip()
        ceremony = self._ceremony(session, "register")
        answer = self._answer(request)
        if not name:
            return await self._new_form(request, session, 400, "Give the passkey a name.", name)
        try:
            data = self._fido().register_complete(ceremony.state, answer)
        except Exception as e:  # fido2 raises several kinds for an answer it refuses
            log.info("passkey registration of {user} refused: {error}", user=session.username,
                     error=type(e).__name__)
            return await self._new_form(request, session, 400, NOT_VERIFIED, name)
        credential = data.credential_data
        assert credential is not None
        try:
            await self._on_store(self._admin(f"portal:{session.username}").add_passkey,
                                 session.username, credential.credential_id, name,
                                 bytes(credential), data.counter)
        except AdminError as e:
            return await self._new_form(request, session, 409, f"{e}. Choose another name.", name)
        except (StoreError, Busy):
            return await self._new_form(request, session, 503, TRY_LATER, name)
        await self._refresh()
        await self._tell(session.dn, self._address(request), notify.notify_passkey,
                         kind=notify.PASSKEY_ADDED, name=name)
        session.notice = f"Your passkey “{name}” is set up. You can sign in with it."
        return self._redirect(request, "/")

    async def _passkey(self, username: str, id: str) -> Passkey | None:
        """The passkey ``id`` (base64url) of ``username``, or None."""
        wanted = credential_id(id)
        try:
            passkeys = await self._on_store(self._stored, username)
        except (StoreError, Busy):
            return None
        return next((p for p in passkeys if p.credential_id == wanted), None)

    @page("/passkeys/<string:id>/remove", "GET")
    async def remove_page(self, request: Any, id: str) -> bytes:
        session, _ = await self._signed_in(request)
        passkey = await self._passkey(session.username, id)
        if passkey is None:
            return self._redirect(request, "/")
        return self._render(request, "confirm.html", session=session,
                            heading=f"Remove the passkey “{passkey.name}”?",
                            text=f"You can no longer sign in with {passkey.name}. This cannot "
                                 f"be undone; you can set it up again.",
                            action=f"/passkeys/{quote(id)}/remove", button="Remove it",
                            cancel="/", fields={})

    @page("/passkeys/<string:id>/remove", "POST")
    async def remove(self, request: Any, id: str) -> bytes:
        session, _ = await self._signed_in(request, form=True)
        passkey = await self._passkey(session.username, id)
        if passkey is None:
            return self._redirect(request, "/")
        try:
            await self._on_store(self._admin(f"portal:{session.username}").remove_passkey,
                                 session.username, passkey.credential_id)
        except (AdminError, StoreError, Busy):
            session.notice = TRY_LATER
            return self._redirect(request, "/")
        session.notice = f"Removed the passkey “{passkey.name}”."
        return self._redirect(request, "/")

    # -- signing in: the password, then a passkey ----------------------------------------

    def begin_sign_in(self, request: Any, attempt: Attempt, decision: Decision,
                      started: float) -> bytes:
        """The password was right and the user has passkeys: a session of
        its own until one answers (called by :class:`~proxy.portal.signin.SignIn`)."""
        account = decision.account
        token, session = self.sessions.start(account.username, account.dn, "passkey")
        session.ceremony = Ceremony("sign_in", None, attempt, decision, started)
        self._set_cookie(request, COOKIE, token)
        return self._redirect(request, "/sign-in/passkey")

    def _half_signed_in(self, request: Any) -> WebSession:
        session = self.sessions.get(self._token(request))
        if session is None or session.stage != "passkey" or \
                not isinstance(session.ceremony, Ceremony):
            raise SignInNeeded()
        return session

    @page("/sign-in/passkey", "GET")
    async def sign_in_page(self, request: Any) -> bytes:
        session = self._half_signed_in(request)
        return await self._sign_in_form(request, session)

    async def _sign_in_form(self, request: Any, session: WebSession, status: int = 200,
                            error: str | None = None) -> bytes:
        pending = session.ceremony
        try:
            options, _ = await self._assertion_options(
                session, "sign_in", attempt=pending.attempt, decision=pending.decision,
                started=pending.started)
        except (StoreError, Busy):
            raise Unavailable(TRY_LATER) from None
        return self._render(request, "passkey_use.html", status, session=None, error=error,
                            options=options, csrf=session.csrf, action="/sign-in/passkey",
                            back="", heading="Sign in with your passkey")

    @page("/sign-in/passkey", "POST")
    async def sign_in(self, request: Any) -> bytes:
        token = self._token(request)
        session = self._half_signed_in(request)
        self._check_form(request, session)
        ceremony = self._ceremony(session, "sign_in")
        attempt, decision = ceremony.attempt, ceremony.decision
        account = decision.account
        answer = self._answer(request)
        # Retried without the password again: the account's lockout still holds.
        locked = self._auth.locked(account, self._address(request)) > 0
        with self._auth.throttle.alone(account.key) as alone:
            try:
                used = await self._verify(session, ceremony, answer) \
                    if alone and not locked else None
            except (StoreError, Busy) as e:
                log.error("portal sign-in of {user}: {error}", user=account.username, error=str(e))
                session.ceremony = ceremony
                return await self._sign_in_form(request, session, 503, TRY_LATER)
            if used is None:
                await self._auth.second_factor_failed(
                    attempt, decision, "passkey:" + str(answer.get("id", ""))[:100],
                    self._reactor.seconds())
                self._record("portal_sign_in", user=account.username,
                             client_address=self._address(request), outcome="refused",
                             method="passkey", reason="wrong_passkey")
                session.ceremony = ceremony
                return await self._sign_in_form(request, session, 401, NOT_VERIFIED)
        self._auth.second_factor_passed(attempt, decision)
        self.sessions.end(token)
        token, _ = self.sessions.start(account.username, account.dn, "signed_in",
                                       started=session.started, method="passkey")
        self._set_cookie(request, COOKIE, token)
        self._record("portal_sign_in", user=account.username,
                     client_address=self._address(request), outcome="accepted",
                     method="passkey", passkey=used.name)
        return self._redirect(request, "/")

    # -- the fresh check with a passkey --------------------------------------------------

    @page("/confirm-it-is-you/passkey", "GET")
    async def fresh_page(self, request: Any) -> bytes:
        session, _ = await self._signed_in(request)
        back = local_path(self._field(request, "next", required=False))
        return await self._fresh_form(request, session, back)

    async def _fresh_form(self, request: Any, session: WebSession, back: str, status: int = 200,
                          error: str | None = None) -> bytes:
        try:
            options, passkeys = await self._assertion_options(session, "fresh")
        except (StoreError, Busy):
            raise Unavailable(TRY_LATER, session=session) from None
        if not passkeys:
            return self._redirect(request, "/confirm-it-is-you?next=" + quote(back))
        return self._render(request, "passkey_use.html", status, session=session, error=error,
                            options=options, csrf=session.csrf,
                            action="/confirm-it-is-you/passkey", back=back,
                            heading="Confirm it is you with a passkey")

    @page("/confirm-it-is-you/passkey", "POST")
    async def fresh(self, request: Any) -> bytes:
        session, account = await self._signed_in(request, form=True)
        back = local_path(self._field(request, "next", required=False))
        ceremony = self._ceremony(session, "fresh")
        answer = self._answer(request)
        address = self._address(request)
        with self._auth.throttle.alone(account.key) as alone:
            if not alone or self._auth.locked(account, address) > 0:
                return await self._fresh_form(request, session, back, 401, NOT_VERIFIED)
            try:
                used = await self._verify(session, ceremony, answer)
            except (StoreError, Busy):
                return await self._fresh_form(request, session, back, 503, TRY_LATER)
            if used is None:
                self._auth.throttle.failed(account.key, address,
                                           "passkey:" + str(answer.get("id", ""))[:100])
                self._record("portal_fresh_check", user=account.username, client_address=address,
                             outcome="refused", method="passkey", reason="wrong_passkey")
                return await self._fresh_form(request, session, back, 401, NOT_VERIFIED)
        self._auth.throttle.succeeded(account.key, address)
        session.strong_at = self._reactor.seconds()
        self._record("portal_fresh_check", user=account.username, client_address=address,
                     outcome="accepted", method="passkey", passkey=used.name)
        session.notice = "Confirmed. Now do it again: it will go through."
        return self._redirect(request, back)
