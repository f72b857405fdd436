"""The portal: sign-in with a second factor, security info, help desk.

Every page is rendered on the server from Jinja2 templates (autoescaped)
with one CSS file and one small script (the copy button, times in the
browser's zone, the zone of an expiry date); forms work without
the script. Every answer carries a strict Content-Security-Policy, no
framing, ``Cache-Control: no-store`` and HSTS (:mod:`proxy.portal.site`).
Every POST carries the session's CSRF token (the sign-in form a cookie's,
double-submitted) and is refused from another origin. Nothing secret is put
in a URL.

The pages are in parts of one job each, mounted on one Klein app:
:mod:`~proxy.portal.signin`, :mod:`~proxy.portal.securityinfo`,
:mod:`~proxy.portal.helpdesk`, over :mod:`~proxy.portal.pages`. A page that
cannot be shown raises; :meth:`Pages.failed` answers for all of them.

The rules of app passwords are :class:`proxy.admin.Admin`'s, run on the
store's thread; sign-ins are the authentication core's. What a user does is
audited with ``actor: portal:USER``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
from klein import Klein

from proxy import secondfactor
from proxy.api.app import Api
from proxy.audit import minute
from proxy.config import Config
from proxy.portal.helpdesk import HelpDesk
from proxy.portal.making import Maker
from proxy.portal.passkeys import Passkeys
from proxy.portal.pages import Context, PageError, Pages, Redirect, iso, page, quote
from proxy.portal.securityinfo import SecurityInfo
from proxy.portal.signin import SignIn
from proxy.portal.site import Site
from proxy.portal.websessions import WebSessions
from proxy.wire.text import printable

HERE = Path(__file__).parent
STATIC_TYPES = {".css": b"text/css; charset=utf-8", ".js": b"text/javascript; charset=utf-8"}


def templates() -> jinja2.Environment:
    """The pages' templates, read and compiled now: never a file read or
    stat on the reactor per page."""
    environment = jinja2.Environment(
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
    environment.filters["when"] = minute
    environment.filters["iso"] = iso
    environment.filters["quote"] = quote
    for name in environment.list_templates():
        environment.get_template(name)
    return environment


class Portal(Pages):
    """The portal's parts put together, its static files, and the one
    handler of the errors its pages raise. Built on the daemon's files pool:
    it reads its templates and static files."""

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
        portal = config().portal
        context = Context(
            reactor=reactor, config=config, authenticator=authenticator, admin=admin,
            store_pool=store_pool, record=record, templates=templates(), files_pool=files_pool,
            sessions=WebSessions(reactor, portal.session_idle, portal.session_max))
        super().__init__(context)
        self._static = {p.name: p.read_bytes() for p in (HERE / "static").iterdir() if p.is_file()}
        maker = Maker(context, hash_secret)
        self.app = Klein()
        passkeys = Passkeys(context)
        for part in (self, SignIn(context, keybox, passkeys=passkeys),
                     SecurityInfo(context, maker, passkeys.enabled),
                     HelpDesk(context, maker), passkeys):
            part.mount(self.app)
        self.app.handle_errors(PageError, Redirect)(self.failed)
        # The REST API (docs/api.md) on the same listener: its own Klein app,
        # its own gate (API tokens) and errors (problem details).
        self.api = Api(reactor=reactor, config=config, authenticator=authenticator, admin=admin,
                       store_pool=store_pool, hash_secret=hash_secret, record=record,
                       end_portal_sessions=context.sessions.end_user)
        self.app.route("/api/v1/", branch=True, endpoint="api")(lambda request: self.api.resource())

    def site(self) -> Site:
        return Site(self.app.resource(), timeout=60, reactor=self._reactor)

    @page("/static/<string:name>", "GET")
    def static(self, request: Any, name: str) -> bytes:
        body = self._static.get(name)
        kind = STATIC_TYPES.get(Path(name).suffix)
        if body is None or kind is None:
            request.setResponseCode(404)
            return b"not found"
        request.setHeader(b"Content-Type", kind)
        request.setHeader(b"Cache-Control", b"public, max-age=3600")
        return body
