"""The API's operations, on a Klein app the portal mounts at ``/api/v1/``.

Every operation is marked with :func:`operation`: the path, the method and
the scope it needs. :meth:`Api._run` is the one gate in front of all of
them: the bearer token (looked up by its keyed hash on the store's thread),
the token's rate, its scope; then the operation, whose errors (raised as
:class:`~proxy.api.problems.Problem`, or the admin rules' and the store's
own) become problem details; then the audit event of the call
(``api_request``, ``actor: api:NAME``, with its status). What an operation
changes goes through :class:`proxy.admin.Admin` acting as ``api:NAME``, on
the store's thread, and the change feed is applied before the answer, as
the help desk's pages do: a deleted app password's sessions have ended when
the caller hears 204.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from klein import Klein
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound

from proxy import apppasswords
from proxy.admin import API_TOKEN_PREFIX, Admin, AdminError, NotFound as NothingThere
from proxy.api import problems, reading, views
from proxy.api.limits import Limits
from proxy.config import Config
from proxy.directory import Account, DirectoryUnavailable
from proxy.store import (
    ApiToken,
    Conflict,
    LimitReached,
    MfaState,
    NameTaken,
    StoreError,
    StoreUnavailable,
)
from proxy.threads import Busy

log = Logger(namespace="legacy_auth_proxy.api")

HERE = Path(__file__).parent
JSON = b"application/json"
SCOPES_ALLOWED = {"read": {"read", "manage", "helpdesk"}, "manage": {"manage", "helpdesk"},
                  "helpdesk": {"helpdesk"}}
FAILURES_PER_MINUTE = 30  # unknown tokens of our form, per address, before 429
BULK_MAX = 100

Handler = TypeVar("Handler", bound=Callable[..., Any])


def operation(path: str, method: str, scope: str = "read") -> Callable[[Handler], Handler]:
    """Marks a method of :class:`Api` as the operation at ``path`` (under
    ``/api/v1``) for ``method``, open to tokens whose scope allows ``scope``."""

    def mark(handler: Handler) -> Handler:
        handler.operation = (path, method, scope)  # type: ignore[attr-defined]
        return handler

    return mark


class Answer:
    """What an operation answers: a status, a JSON body (or none), headers."""

    def __init__(self, status: int, body: Any = None, **headers: str) -> None:
        self.status = status
        self.body = body
        self.headers = {name.replace("_", "-").encode(): value.encode()
                        for name, value in headers.items()}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document shipped beside this module; read once, when the
    API is built (off the reactor: the portal is built on the files pool)."""
    return yaml.safe_load((HERE / "openapi.yaml").read_text(encoding="utf-8"))


class Api:
    """The operations, the gate in front of them, and the app they are on."""

    def __init__(
        self,
        *,
        reactor: Any,
        config: Callable[[], Config],
        authenticator: Any,
        admin: Callable[[str], Any],
        store_pool: Any,
        hash_secret: Callable[[str], Any],
        record: Callable[..., None],
        end_portal_sessions: Callable[[str], None],
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._auth = authenticator
        self._admin = admin
        self._store_pool = store_pool
        self._hash = hash_secret
        self._record = record
        self._end_portal_sessions = end_portal_sessions
        self._limits = Limits(reactor.seconds)
        self._document = json.dumps(openapi_document(), ensure_ascii=False).encode("utf-8")
        self.app = Klein()
        for name in dir(type(self)):
            handler = getattr(type(self), name)
            if hasattr(handler, "operation"):
                path, method, scope = handler.operation
                self._mount(path, method, scope, getattr(self, name), name)
        self.app.route("/openapi.json", methods=["GET"])(self.document)
        self.app.handle_errors(NotFound)(self._not_found)
        self.app.handle_errors(MethodNotAllowed)(self._not_allowed)

    def _mount(self, path: str, method: str, scope: str,
               handler: Callable[..., Awaitable[Answer]], name: str) -> None:
        async def run(request: Any, **kwargs: Any) -> bytes:
            return await self._run(request, scope, handler, kwargs)

        self.app.route(path, methods=[method], endpoint=name)(run)

    def resource(self) -> Any:
        return self.app.resource()

    # -- the gate ---------------------------------------------------------------------

    async def _run(self, request: Any, scope: str, handler: Callable[..., Awaitable[Answer]],
                   kwargs: dict[str, Any]) -> bytes:
        address = reading.address(request)
        token: ApiToken | None = None
        try:
            token = await self._token(request, address)
            wait = self._limits.take("token:" + token.name, token.rate)
            if wait:
                raise problems.TooManyRequests(
                    f"this token may make {token.rate} requests a minute",
                    headers={b"Retry-After": str(wait).encode()})
            if token.scope not in SCOPES_ALLOWED[scope]:
                raise problems.Forbidden(
                    f"the token's scope is {token.scope}; this needs {scope}"
                    + (" or helpdesk" if scope == "manage" else ""))
            admin = self._admin(f"api:{token.name}")
            answer = await self._guarded(handler, request, admin, kwargs)
            body = self._answer(request, answer)
        except problems.Problem as problem:
            body = problem.answer(request)
        self._record("api_request", actor=f"api:{token.name}" if token else None,
                     method=request.method.decode("ascii", "replace"),
                     path=request.path.decode("utf-8", "replace"), status=request.code,
                     address=address)
        return body

    async def _guarded(self, handler: Callable[..., Awaitable[Answer]], request: Any, admin: Any,
                       kwargs: dict[str, Any]) -> Answer:
        """The operation, its errors as problems."""
        try:
            return await handler(request, admin, **kwargs)
        except problems.Problem:
            raise
        except NothingThere as e:
            raise problems.NotFound(str(e)) from None
        except LimitReached as e:
            raise problems.Conflict(f"{e}; delete one first", limit=e.limit) from None
        except NameTaken as e:
            raise problems.Conflict(str(e)) from None
        except Conflict as e:
            raise problems.PreconditionFailed(f"{e}; read it again") from None
        except AdminError as e:
            raise problems.BadRequest(str(e)) from None
        except (StoreUnavailable, Busy, DirectoryUnavailable):
            raise problems.Unavailable("the store or the directory does not answer just now",
                                       headers={b"Retry-After": b"5"}) from None
        except StoreError as e:
            raise problems.Unavailable(str(e), headers={b"Retry-After": b"5"}) from None
        except Exception:
            log.failure("the API's {path} failed", path=request.path.decode("utf-8", "replace"))
            raise problems.Problem("the server could not do this; it is logged") from None

    async def _token(self, request: Any, address: str) -> ApiToken:
        """The bearer token's record; raises Unauthenticated. Only what costs
        a look-up in the store (a token of our form) is counted against the
        address: past :data:`FAILURES_PER_MINUTE` unknown ones, TooManyRequests,
        so that no one keeps the store's thread, which sign-ins share, busy."""
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        kind, _, secret = header.strip().partition(" ")
        secret = secret.strip()
        if kind.lower() != "bearer" or not secret:
            raise problems.Unauthenticated(
                "send 'Authorization: Bearer TOKEN' (legacy-auth-proxy api-token create)",
                headers={b"WWW-Authenticate": b'Bearer realm="legacy-auth-proxy"'})
        invalid = problems.Unauthenticated(
            "the token is not known, revoked or expired",
            headers={b"WWW-Authenticate": b'Bearer realm="legacy-auth-proxy", '
                                          b'error="invalid_token"'})
        if not secret.startswith(API_TOKEN_PREFIX) or len(secret) > 128:
            raise invalid
        wait = self._limits.waiting("address:" + address, FAILURES_PER_MINUTE)
        if wait:
            raise problems.TooManyRequests("too many unknown tokens from this address",
                                           headers={b"Retry-After": str(wait).encode()})
        try:
            token = await self._store_pool.submit(self._admin("api").api_token, secret)
        except (StoreError, Busy):
            raise problems.Unavailable("the store does not answer just now",
                                       headers={b"Retry-After": b"5"}) from None
        if token is None:
            self._limits.take("address:" + address, FAILURES_PER_MINUTE)
            raise invalid
        return token

    @staticmethod
    def _answer(request: Any, answer: Answer) -> bytes:
        request.setResponseCode(answer.status)
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        if answer.body is None:
            return b""
        request.setHeader(b"Content-Type", JSON)
        return json.dumps(answer.body, ensure_ascii=False).encode("utf-8")

    def document(self, request: Any) -> bytes:
        """The OpenAPI document: open to anyone, it holds nothing secret."""
        request.setHeader(b"Content-Type", JSON)
        return self._document

    def _not_found(self, request: Any, failure: Any) -> bytes:
        return problems.NotFound("there is no such operation; see /api/v1/openapi.json") \
            .answer(request)

    def _not_allowed(self, request: Any, failure: Any) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None) or []
        return problems.MethodNotAllowed(
            f"{request.method.decode('ascii', 'replace')} is not allowed here",
            headers={b"Allow": ", ".join(allowed).encode()}).answer(request)

    def _page(self, request: Any, page: Any) -> Answer:
        now, idle = self._reactor.seconds(), self._config().policy.app_password_idle_expiry
        return Answer(200, {
            "items": [views.app_password(r, now, idle) for r in page.records],
            "next_page_token": views.page_token(page.after) if page.after else None,
        })

    async def _account(self, name: str, *, required: bool = True) -> tuple[str, Account | None]:
        """The user ``name`` stands for: the store's key and the directory's
        account. An account is ``required`` to change a user's state or make
        an app password; reading or deleting app passwords works for a name
        the directory no longer knows (a deleted account's leftovers)."""
        try:
            canonical = Admin.username(name)
        except AdminError as e:
            raise problems.BadRequest(str(e)) from None
        try:
            account = await self._auth.account(name)
        except DirectoryUnavailable:
            if required:
                raise
            account = None
        if account is None and required:
            raise problems.NotFound(f"no user named {name!r} in the directory")
        return (account.username if account is not None else canonical), account

    async def _on_store(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self._store_pool.submit(function, *args, **kwargs)

    async def _changed(self) -> None:
        """Apply the store's change feed now: what was done takes effect
        before the answer (a deleted app password's sessions end)."""
        await self._auth.poll_changes()

    # -- users --------------------------------------------------------------------------

    @operation("/users/<string:name>", "GET")
    async def get_user(self, request: Any, admin: Any, name: str) -> Answer:
        username, account = await self._account(name)

        def read() -> tuple[Any, bool, int]:
            return admin.user(username), admin.has_second_factor(username), \
                len(admin.list(username))

        user, second_factor, count = await self._on_store(read)
        return Answer(200, views.user(user, account, second_factor=second_factor,
                                      locked_for=self._auth.locked(account),
                                      app_passwords=count))

    @operation("/users/<string:name>/mfa", "GET")
    async def get_mfa(self, request: Any, admin: Any, name: str) -> Answer:
        username, account = await self._account(name)
        user = await self._on_store(admin.user, username)
        return Answer(200, views.mfa(user, account), ETag=views.etag(user))

    @operation("/users/<string:name>/mfa", "PUT", "helpdesk")
    async def put_mfa(self, request: Any, admin: Any, name: str) -> Answer:
        """Set the MFA state, only if it is still the one read (If-Match):
        two help desks changing one user never overwrite each other unseen."""
        body = reading.body(request)
        if set(body) != {"state"} or body["state"] not in [s.value for s in MfaState]:
            raise problems.BadRequest("the body is {\"state\": \"disabled\" | \"enabled\" | "
                                      "\"enforced\"}")
        wanted = (request.getHeader(b"if-match") or b"").decode("latin-1").strip()
        if not wanted:
            raise problems.PreconditionRequired(
                "send If-Match with the ETag of GET .../mfa (or If-Match: * to change it "
                "whatever it is)")
        username, account = await self._account(name)

        def change() -> Any:
            before = admin.user(username)
            tags = [t.strip() for t in wanted.split(",")]
            if "*" not in tags and views.etag(before) not in tags:
                raise Conflict(f"the MFA state of {username} changed since it was read")
            return admin.set_mfa(username, MfaState(body["state"]), expected=before)

        after = await self._on_store(change)
        await self._changed()
        return Answer(200, views.mfa(after, account), ETag=views.etag(after))

    @operation("/users/<string:name>/unlock", "POST", "helpdesk")
    async def unlock(self, request: Any, admin: Any, name: str) -> Answer:
        username, _ = await self._account(name)
        await self._on_store(admin.unlock, username)
        await self._changed()
        return Answer(204)

    @operation("/users/<string:name>/reset-second-factor", "POST", "helpdesk")
    async def reset_second_factor(self, request: Any, admin: Any, name: str) -> Answer:
        username, _ = await self._account(name)
        had = await self._on_store(admin.reset_second_factor, username)
        self._end_portal_sessions(username)
        await self._changed()
        return Answer(200, {"user": username, "had_one": had})

    @operation("/users/<string:name>/reset-passkeys", "POST", "helpdesk")
    async def reset_passkeys(self, request: Any, admin: Any, name: str) -> Answer:
        username, _ = await self._account(name)
        count = await self._on_store(admin.reset_passkeys, username)
        self._end_portal_sessions(username)
        await self._changed()
        return Answer(200, {"user": username, "removed": count})

    # -- app passwords ------------------------------------------------------------------

    @operation("/app-passwords", "GET")
    async def list_all(self, request: Any, admin: Any) -> Answer:
        filters = reading.filters(request)
        user = reading.query(request, "user")
        if user is not None:
            filters["username"], _ = await self._account(user, required=False)
        return self._page(request, await self._on_store(
            lambda: admin.app_passwords_page(**filters)))

    @operation("/users/<string:name>/app-passwords", "GET")
    async def list_users(self, request: Any, admin: Any, name: str) -> Answer:
        filters = reading.filters(request)
        filters["username"], _ = await self._account(name, required=False)
        return self._page(request, await self._on_store(
            lambda: admin.app_passwords_page(**filters)))

    @operation("/users/<string:name>/app-passwords/<string:id>", "GET")
    async def get_app_password(self, request: Any, admin: Any, name: str, id: str) -> Answer:
        username, _ = await self._account(name, required=False)
        record = await self._on_store(admin.app_password, username, id)
        idle = self._config().policy.app_password_idle_expiry
        return Answer(200, views.app_password(record, self._reactor.seconds(), idle))

    @operation("/users/<string:name>/app-passwords", "POST", "manage")
    async def create(self, request: Any, admin: Any, name: str) -> Answer:
        """Make an app password for the user (a printer, a scanner): the
        secret is in this answer only. The help desk's rules: the user must
        be in the directory, the limit and names hold; argon2 runs in the
        hashing pool, never on the store's thread."""
        body = reading.body(request)
        wanted = reading.wanted(body, self._reactor.seconds())
        username, _ = await self._account(name)
        username, networks = admin.checked(username, wanted["name"], **{
            k: wanted[k] for k in ("expires_at", "protocols", "networks")})
        secret = apppasswords.generate()
        encoded = await self._hash(secret)
        made = await self._on_store(admin.create, username, wanted["name"],
                                    expires_at=wanted["expires_at"],
                                    protocols=wanted["protocols"], networks=networks,
                                    secret=secret, password_hash=encoded)
        idle = self._config().policy.app_password_idle_expiry
        shown = views.app_password(made.record, self._reactor.seconds(), idle)
        shown["secret"] = apppasswords.display(made.secret)
        return Answer(201, shown, Location=f"/api/v1/users/{_quote(username)}/app-passwords/"
                                           f"{made.record.id}")

    @operation("/users/<string:name>/app-passwords/<string:id>", "DELETE", "manage")
    async def delete(self, request: Any, admin: Any, name: str, id: str) -> Answer:
        username, _ = await self._account(name, required=False)

        def delete() -> Any:
            admin.app_password(username, id)  # by id only, never a name
            return admin.delete(username, id)

        await self._on_store(delete)
        await self._changed()
        return Answer(204)

    @operation("/users/<string:name>/app-passwords/revoke-all", "POST", "manage")
    async def revoke_all(self, request: Any, admin: Any, name: str) -> Answer:
        username, _ = await self._account(name, required=False)
        gone = await self._on_store(admin.revoke_all, username)
        await self._changed()
        return Answer(200, {"user": username, "deleted": [r.id for r in gone]})

    @operation("/app-passwords/bulk-delete", "POST", "manage")
    async def bulk_delete(self, request: Any, admin: Any) -> Answer:
        """Delete up to 100 app passwords, each named by user and id: one
        result each, in order; one that cannot be deleted stops no other."""
        body = reading.body(request)
        items = body.get("items")
        if set(body) != {"items"} or not isinstance(items, list) or not items \
                or len(items) > BULK_MAX or not all(
                    isinstance(i, dict) and set(i) == {"user", "id"}
                    and all(isinstance(v, str) for v in i.values()) for i in items):
            raise problems.BadRequest(f"the body is {{\"items\": [{{\"user\": ..., \"id\": "
                                      f"...}}]}}, 1 to {BULK_MAX} items")
        named = [await self._item_user(i["user"]) for i in items]
        results = await self._on_store(admin.delete_many,
                                       [(u, i["id"]) for u, i in zip(named, items)])
        await self._changed()
        return Answer(200, {"results": [
            {"user": u, "id": i["id"], **_outcome(r)} for u, i, r in zip(named, items, results)
        ]})

    async def _item_user(self, name: str) -> str:
        """A bulk item's user as the store keys them; a name that cannot be
        one is passed on as it is, for the admin rules to refuse as that
        item's result (400), not the whole request's."""
        try:
            return (await self._account(name, required=False))[0]
        except problems.BadRequest:
            return name

    @operation("/app-passwords/bulk-revoke", "POST", "manage")
    async def bulk_revoke(self, request: Any, admin: Any) -> Answer:
        """Delete every app password of up to 100 users: one result each."""
        body = reading.body(request)
        users = body.get("users")
        if set(body) != {"users"} or not isinstance(users, list) or not users \
                or len(users) > BULK_MAX or not all(isinstance(u, str) for u in users):
            raise problems.BadRequest(f"the body is {{\"users\": [...]}}, 1 to {BULK_MAX} names")
        named = [await self._item_user(u) for u in users]
        results = await self._on_store(admin.revoke_all_many, named)
        await self._changed()
        return Answer(200, {"results": [
            {"user": u, **_outcome(r, lambda gone: {"deleted": [a.id for a in gone]})}
            for u, r in zip(named, results)
        ]})


def _outcome(result: Any, done: Callable[[Any], dict[str, Any]] = lambda _: {}) -> dict[str, Any]:
    """One bulk item's result: done (its status and what was done) or why not."""
    if isinstance(result, NothingThere):
        return {"status": 404, "detail": str(result)}
    if isinstance(result, AdminError):
        return {"status": 400, "detail": str(result)}
    return {"status": 200, **done(result)}


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")
