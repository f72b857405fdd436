"""Making an app password from the portal's form, for the user's own page
and the help desk's alike: the form read into what is wanted, the pace of
creations (each costs an argon2 hash: the core's throttle keeps the rule),
the mail that tells the user, and the new secret held for the one page that
shows it (the form is answered with a redirect, so a reload sends nothing).

The rules of app passwords are :class:`proxy.admin.Admin`'s; what cannot be
made raises :class:`CannotCreate` with the status and the words for the page.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.logger import Logger

from proxy import apppasswords
from proxy.admin import AdminError
from proxy.config import parse_expiry
from proxy.directory import Account
from proxy.portal import notify
from proxy.portal.pages import TRY_LATER, Context
from proxy.portal.words import end_of_day, quoted
from proxy.store import PROTOCOLS, AppPassword, LimitReached, NameTaken, StoreError
from proxy.threads import Busy

log = Logger(namespace="legacy_auth_proxy.portal")


class CannotCreate(Exception):
    """The app password was not made: ``status`` and what to tell the person."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@attrs.frozen
class Wanted:
    """An app password as the form asks for it, checked for shape."""

    name: str
    expires_at: float | None
    protocols: frozenset[str] | None  # None: all
    networks: tuple[str, ...] | None  # None: anywhere


@attrs.frozen
class Shown:
    """A new app password waiting, in its maker's page session, for the
    page that shows it once."""

    record: AppPassword
    secret: str = attrs.field(repr=False)  # as displayed: four groups of four
    owner: str | None  # the user it is for, when the help desk made it


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


class Maker:
    def __init__(self, context: Context, hash_secret: Callable[[str], Any]) -> None:
        self._reactor = context.reactor
        self._config = context.config
        self._admin = context.admin
        self._store_pool = context.store_pool
        self._hash = hash_secret  # argon2 in the hashing pool: a Deferred of the hash
        self._throttle = context.authenticator.throttle

    def wanted(self, name: str, expires: str, chosen: list[str], networks_text: str,
               offset: str = "") -> Wanted:
        """The form's fields as an app password; raises CannotCreate (400)
        naming what to correct. An expiry date works all of that day, in
        the zone ``offset`` (minutes east of UTC, as the page's script read
        the browser's; without it, UTC)."""
        if not name:
            raise CannotCreate(400, "Give the app password the name of the device it is for.")
        problem = apppasswords.check_name(name)
        if problem:
            raise CannotCreate(400, sentence(problem))
        now = self._reactor.seconds()
        expires_at = None
        if expires:
            try:
                # "Expires on" a day: it works all of that day, until its
                # last second (listed as 23:59 of that day, not 00:00 of the next).
                expires_at = end_of_day(expires, offset) if len(expires) == 10 \
                    else parse_expiry(expires, now)
            except ValueError:
                raise CannotCreate(400, "Give the expiry as a date (2027-01-31), or leave it "
                                        "empty.") from None
            if expires_at <= now:
                raise CannotCreate(400, "The expiry is in the past: choose a later date.")
        protocols = None
        if chosen:
            if not set(chosen) <= set(PROTOCOLS):
                raise CannotCreate(400, "Choose protocols from the list.")
            if set(chosen) != set(PROTOCOLS):
                protocols = frozenset(chosen)
        parts = networks_text.replace(",", " ").split()
        return Wanted(name, expires_at, protocols, tuple(parts) if parts else None)

    async def make(self, person: str, username: str, wanted: Wanted) -> Any:
        """Create an app password for ``username`` as ``person`` (the
        signed-in user): the Created, or CannotCreate. Argon2 runs in the
        hashing pool, never on the store's thread."""
        admin = self._admin(f"portal:{person}")
        try:
            username, networks = admin.checked(username, wanted.name, expires_at=wanted.expires_at,
                                               protocols=wanted.protocols, networks=wanted.networks)
        except AdminError as e:
            raise CannotCreate(400, sentence(str(e))) from None
        if not self._throttle.may_create(f"portal:{person}"):
            raise CannotCreate(429, "That is many app passwords in a minute. Wait a minute, "
                                    "then try again.")
        secret = apppasswords.generate()
        try:
            encoded = await self._hash(secret)
            return await self._store_pool.submit(
                admin.create, username, wanted.name, expires_at=wanted.expires_at,
                protocols=wanted.protocols, networks=networks, secret=secret,
                password_hash=encoded)
        except LimitReached as e:
            raise CannotCreate(409, f"{'You have' if username == person else username + ' has'} "
                                    f"{e.count} app passwords, the most allowed. Delete one that "
                                    f"is no longer used, then create the new one.") from None
        except NameTaken:
            raise CannotCreate(409, f"There is an app password named {quoted(wanted.name)} already. "
                                    f"Choose another name, or delete that one first.") from None
        except AdminError as e:
            raise CannotCreate(400, f"{e}.") from None
        except (StoreError, Busy):
            raise CannotCreate(503, TRY_LATER) from None

    def notify(self, account: Account, device: str, address: str, actor: str,
               always: bool = False) -> None:
        """Mail the user of a new app password, in the background; ``always``
        (the help desk made it, and saw it), whatever ``notify_on_create`` says."""
        portal = self._config().portal
        if not (portal.notify_on_create or always) or portal.mail_relay is None or not account.mail:
            return
        try:
            notify.notify_created(
                self._reactor, portal.mail_relay, portal.mail_from, account.mail,
                username=account.username, device=device, at=self._reactor.seconds(),
                address=address, actor=actor, title=portal.title)
        except Exception:
            # The app password exists: its page must be shown whatever the mail does.
            log.failure("cannot mail {user} of a new app password", user=account.username)
