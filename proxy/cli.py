"""The command line: ``legacy-auth-proxy [--config PATH] COMMAND …``.

Operators and the help desk manage app passwords and users' MFA state here;
``serve`` runs the daemon and ``demo`` the embedded default. Exit codes:
0 done, 1 refused (the message says why), 2 bad usage, 75 the store cannot
be reached now (EX_TEMPFAIL: try again; systemd restarts the daemon), 78 bad
config or state (EX_CONFIG: systemd does not restart the daemon for it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from proxy import __version__, apppasswords, config as configuration
from proxy.admin import API_TOKEN_RATE, Admin, AdminError, Created
from proxy.api.views import app_password as app_password_json
from proxy.audit import minute, timestamp
from proxy.bootstrap import StartupError, StoreUnreachable, command_line_actor, open_admin, open_store
from proxy.store import (
    API_SCOPES,
    PROTOCOLS,
    ApiToken,
    AppPassword,
    LimitReached,
    MfaState,
    StoreError,
    StoreUnavailable,
    User,
)
from proxy.wire.text import json_printable, printable

EX_OK = 0
EX_REFUSED = 1
EX_USAGE = 2
EX_TEMPFAIL = 75
EX_CONFIG = 78
TEMPORARY = "a temporary failure: try again once it answers"


class Failure(Exception):
    """Ends the command with a message on standard error and an exit code."""

    def __init__(self, message: str, code: int = EX_REFUSED) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def cannot_start(cls, error: Exception) -> Failure:
        """A store that cannot be reached now is temporary; any other reason
        a command cannot start is the config's or the state's."""
        if isinstance(error, StoreUnreachable):
            return cls(f"{error}; {TEMPORARY}", EX_TEMPFAIL)
        return cls(str(error), EX_CONFIG)


# -- output ------------------------------------------------------------------


def _table(rows: list[list[str]]) -> str:
    # Every cell escaped: a name or an address (an old row, a balancer's
    # header) may hold an escape sequence or a line break for the terminal.
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    )


def _app_password_table(records: list[AppPassword], now: float, idle: float | None) -> str:
    rows = [["ID", "NAME", "STATE", "CREATED", "LAST USED", "EXPIRES", "PROTOCOLS", "FROM", "USES"]]
    for a in records:
        used = minute(a.last_used_at)
        if a.last_used_at is not None:
            used += f" {a.last_used_protocol or ''} {a.last_used_address or ''}".rstrip()
        stopped = a.stopped(now, idle)
        state = "working" if stopped is None else f"stopped {minute(a.stopped_since(idle))} ({stopped})"
        scope = ",".join(sorted(a.protocols)) if a.protocols is not None else "all"
        networks = ",".join(a.networks) if a.networks is not None else "anywhere"
        rows.append([a.id, a.name, state, minute(a.created_at), used, minute(a.expires_at), scope,
                     networks, str(a.use_count)])
    return _table(rows)


def _print_json(value: Any) -> None:
    text = json.dumps(value, indent=2, ensure_ascii=False)
    print("\n".join(json_printable(line) for line in text.split("\n")))  # the indent's own breaks kept


def _show_created(created: Created, as_json: bool) -> None:
    record = created.record
    if as_json:
        _print_json({**app_password_json(record, time.time(), None),
                     "secret": apppasswords.display(created.secret)})
        return
    print(f"App password for {record.username}, device {record.name!r}, id {record.id}:")
    print()
    print(f"    {apppasswords.display(created.secret)}")
    print()
    print("Enter it in the device now, in place of the password. It is shown only this once.")


# -- commands ----------------------------------------------------------------


@attrs.define
class Context:
    """What a command needs, opened lazily: the config, then the store."""

    config_path: Path
    _config: configuration.Config | None = None
    _admin: Admin | None = None

    @property
    def config(self) -> configuration.Config:
        if self._config is None:
            self._config = configuration.load(self.config_path)
        return self._config

    def admin(self) -> Admin:
        if self._admin is None:
            try:
                self._admin = open_admin(self.config, command_line_actor())
            except StartupError as e:
                raise Failure.cannot_start(e) from None
        return self._admin

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None


def _protocols(text: str | None) -> frozenset[str] | None:
    if text is None:
        return None
    chosen = frozenset(p.strip().lower() for p in text.split(",") if p.strip())
    unknown = chosen.difference(PROTOCOLS)
    if unknown or not chosen:
        raise Failure(
            f"--protocols takes a comma-separated list of {', '.join(PROTOCOLS)}; got {text!r}",
            EX_USAGE,
        )
    return chosen


def _expires(args: argparse.Namespace) -> float | None:
    """``--expires`` (90d, 12h, a date) as a time, or None."""
    if args.expires is None:
        return None
    try:
        return configuration.parse_expiry(args.expires, time.time())
    except ValueError as e:
        raise Failure(f"--expires: {e}", EX_USAGE) from None


def cmd_app_password_create(ctx: Context, args: argparse.Namespace) -> int:
    expires_at = _expires(args)
    admin = ctx.admin()
    try:
        created = admin.create(
            args.user, args.name, expires_at=expires_at, protocols=_protocols(args.protocols),
            networks=tuple(args.network) if args.network else None,
        )
    except LimitReached as e:
        raise Failure(
            f"{e.username} already has {e.count} app passwords, the most allowed "
            f"(policy.max_app_passwords_per_user = {e.limit}).\n"
            f"Delete one first: 'legacy-auth-proxy app-password list {e.username}' shows "
            f"them, 'legacy-auth-proxy app-password delete {e.username} ID' deletes one."
        ) from None
    _show_created(created, args.json)
    return EX_OK


def cmd_app_password_list(ctx: Context, args: argparse.Namespace) -> int:
    records = ctx.admin().list(args.user)
    idle, now = ctx.config.policy.app_password_idle_expiry, time.time()
    if args.json:
        _print_json([app_password_json(a, now, idle) for a in records])
    elif not records:
        print(f"{Admin.username(args.user)} has no app passwords.")
    else:
        print(_app_password_table(records, now, idle))
    return EX_OK


def cmd_app_password_delete(ctx: Context, args: argparse.Namespace) -> int:
    deleted = ctx.admin().delete(args.user, args.app_password)
    print(f"Deleted app password {deleted.id} ({deleted.name!r}) of {deleted.username}.")
    return EX_OK


def cmd_app_password_revoke_all(ctx: Context, args: argparse.Namespace) -> int:
    deleted = ctx.admin().revoke_all(args.user)
    print(f"Deleted all {len(deleted)} app passwords of {Admin.username(args.user)}.")
    return EX_OK


def _user_json(user: User, records: list[AppPassword]) -> dict[str, Any]:
    used = [a.last_used_at for a in records if a.last_used_at is not None]
    return {
        "user": user.username,
        "mfa_state": user.mfa_state.value,
        "mfa_registered_at": timestamp(user.mfa_registered_at) if user.mfa_registered_at else None,
        "app_passwords": len(records),
        "app_password_last_used_at": timestamp(max(used)) if used else None,
    }


def cmd_user_show(ctx: Context, args: argparse.Namespace) -> int:
    admin = ctx.admin()
    user = admin.user(args.user)
    records = admin.list(args.user)
    if args.json:
        _print_json(_user_json(user, records))
        return EX_OK
    used = [a.last_used_at for a in records if a.last_used_at is not None]
    limit = ctx.config.policy.max_app_passwords_per_user
    print(f"user:           {user.username}")
    print(f"MFA state:      {user.mfa_state.value}")
    print(f"registered:     {minute(user.mfa_registered_at, 'no')}")
    print(f"app passwords:  {len(records)} of {limit}")
    print(f"last used:      {minute(max(used) if used else None)}")
    return EX_OK


def cmd_user_set_mfa(ctx: Context, args: argparse.Namespace) -> int:
    user = ctx.admin().set_mfa(args.user, MfaState(args.state))
    print(f"MFA state of {user.username}: {user.mfa_state.value}")
    return EX_OK


def cmd_user_enroll(ctx: Context, args: argparse.Namespace) -> int:
    user, created = ctx.admin().enroll(args.user, args.name)
    if not args.json:
        print(f"{user.username} is registered for MFA (state {user.mfa_state.value}).")
    _show_created(created, args.json)
    return EX_OK


def cmd_user_unlock(ctx: Context, args: argparse.Namespace) -> int:
    ctx.admin().unlock(args.user)
    print(f"Lockouts of {Admin.username(args.user)} are lifted on every running daemon "
          f"(within a second).")
    return EX_OK


def cmd_user_reset_second_factor(ctx: Context, args: argparse.Namespace) -> int:
    had = ctx.admin().reset_second_factor(args.user)
    name = Admin.username(args.user)
    print(f"{name} sets up an authenticator app at their next portal sign-in." if had
          else f"{name} had no authenticator app set up.")
    return EX_OK


def cmd_user_reset_passkeys(ctx: Context, args: argparse.Namespace) -> int:
    gone = ctx.admin().reset_passkeys(args.user)
    name = Admin.username(args.user)
    print(f"Removed {gone} passkeys of {name}; they sign in to the portal with their "
          f"authenticator app." if gone else f"{name} had no passkeys.")
    return EX_OK


def _api_token_json(t: ApiToken) -> dict[str, Any]:
    return {
        "name": t.name, "scope": t.scope, "created_at": timestamp(t.created_at),
        "created_by": t.created_by,
        "expires_at": timestamp(t.expires_at) if t.expires_at is not None else None,
        "rate_per_minute": t.rate,
        "last_used_at": timestamp(t.last_used_at) if t.last_used_at is not None else None,
    }


def cmd_api_token_create(ctx: Context, args: argparse.Namespace) -> int:
    expires_at = _expires(args)
    made = ctx.admin().create_api_token(args.name, args.scope, expires_at=expires_at,
                                        rate=args.rate)
    if args.json:
        _print_json({**_api_token_json(made.record), "token": made.token})
        return EX_OK
    print(f"API token {made.record.name!r}, scope {made.record.scope}"
          f"{', expires ' + minute(expires_at) if expires_at is not None else ''}:")
    print()
    print(f"    {made.token}")
    print()
    print("Send it as 'Authorization: Bearer TOKEN'. It is shown only this once.")
    return EX_OK


def cmd_api_token_list(ctx: Context, args: argparse.Namespace) -> int:
    tokens = ctx.admin().api_tokens()
    if args.json:
        _print_json([_api_token_json(t) for t in tokens])
    elif not tokens:
        print("There are no API tokens.")
    else:
        rows = [["NAME", "SCOPE", "CREATED", "BY", "EXPIRES", "RATE/MIN", "LAST USED"]]
        for t in tokens:
            rows.append([t.name, t.scope, minute(t.created_at), t.created_by, minute(t.expires_at),
                         str(t.rate), minute(t.last_used_at)])
        print(_table(rows))
    return EX_OK


def cmd_api_token_revoke(ctx: Context, args: argparse.Namespace) -> int:
    gone = ctx.admin().revoke_api_token(args.name)
    print(f"Revoked API token {gone.name!r}: it is refused from the next request on.")
    return EX_OK


def cmd_migrate(ctx: Context, args: argparse.Namespace) -> int:
    config = ctx.config
    try:
        store = open_store(config, migrate=True)
    except StartupError as e:
        raise Failure.cannot_start(e) from None
    where = getattr(store, "where", None) or str(config.store.path)
    version = store.schema_version
    store.close()
    print(f"{where}: the schema is at version {version}, the latest")
    return EX_OK


def cmd_check_config(ctx: Context, args: argparse.Namespace) -> int:
    config = ctx.config
    print(f"{config.source}: the config is valid")
    return EX_OK


def cmd_serve(ctx: Context, args: argparse.Namespace) -> int:
    from proxy.runner import run_daemon

    return run_daemon(ctx.config_path, ctx.config)


def cmd_demo(ctx: Context, args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(Path(args.folder), serve=not args.no_serve, workers=args.workers)


# -- parser ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="legacy-auth-proxy",
        description="App passwords for legacy IMAP, POP3, SMTP submission and LDAP clients.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"the config file (default: ${configuration.ENVIRONMENT_VARIABLE}, "
        f"else {configuration.DEFAULT_PATH})",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        group: Any, name: str, handler: Callable[[Context, argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    def with_json(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--json", action="store_true", help="print JSON")
        return sub

    ap = commands.add_parser(
        "app-password", help="create, list and delete app passwords", description="App passwords."
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    sub = with_json(command(ap, "create", cmd_app_password_create,
                            "create an app password and show it once"))
    sub.add_argument("user", metavar="USER")
    sub.add_argument("--name", required=True, help="the device it is for, 1-64 characters")
    sub.add_argument("--expires", metavar="DURATION|DATE",
                     help="when it stops working: 90d, 12h, or a date such as 2027-01-31")
    sub.add_argument("--protocols", metavar="LIST",
                     help="where it may be used: a comma-separated list of " + ", ".join(PROTOCOLS))
    sub.add_argument("--network", action="append", metavar="CIDR",
                     help="only from this network (192.0.2.0/24, 2001:db8::/32); repeat for more")
    sub = with_json(command(ap, "list", cmd_app_password_list,
                            "list a user's app passwords (never the secrets)"))
    sub.add_argument("user", metavar="USER")
    sub = command(ap, "delete", cmd_app_password_delete, "delete one app password")
    sub.add_argument("user", metavar="USER")
    sub.add_argument("app_password", metavar="ID|NAME")
    sub = command(ap, "revoke-all", cmd_app_password_revoke_all,
                  "delete all of a user's app passwords")
    sub.add_argument("user", metavar="USER")

    us = commands.add_parser(
        "user", help="show a user and set their MFA state", description="Users' cloud state."
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    sub = with_json(command(us, "show", cmd_user_show, "show a user's MFA state and app passwords"))
    sub.add_argument("user", metavar="USER")
    sub = command(us, "set-mfa", cmd_user_set_mfa, "set a user's MFA state")
    sub.add_argument("user", metavar="USER")
    sub.add_argument("state", choices=[s.value for s in MfaState])
    sub = command(us, "unlock", cmd_user_unlock,
                  "lift a user's lockout after failed sign-ins, on every running daemon")
    sub.add_argument("user", metavar="USER")
    sub = command(us, "reset-second-factor", cmd_user_reset_second_factor,
                  "forget a user's authenticator app (a lost phone): they set one up again "
                  "at their next portal sign-in")
    sub.add_argument("user", metavar="USER")
    sub = command(us, "reset-passkeys", cmd_user_reset_passkeys,
                  "remove every passkey of a user (a lost key or phone): they sign in to the "
                  "portal with their authenticator app")
    sub.add_argument("user", metavar="USER")
    sub = with_json(command(us, "enroll", cmd_user_enroll,
                            "register a user for MFA and issue their first app password"))
    sub.add_argument("user", metavar="USER")
    sub.add_argument("--name", default="first device",
                     help="the device the first app password is for (default: %(default)s)")

    at = commands.add_parser(
        "api-token", help="create, list and revoke tokens of the REST API",
        description="Tokens of the REST API (docs/api.md)."
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    sub = with_json(command(at, "create", cmd_api_token_create,
                            "create an API token and show it once"))
    sub.add_argument("name", metavar="NAME",
                     help="who or what uses it (audited as api:NAME): letters, digits, . _ -")
    sub.add_argument("--scope", required=True, choices=API_SCOPES,
                     help="read: GET only; manage: app passwords too; helpdesk: users too")
    sub.add_argument("--expires", metavar="DURATION|DATE",
                     help="when it stops working: 90d, 12h, or a date such as 2027-01-31")
    sub.add_argument("--rate", type=int, default=API_TOKEN_RATE, metavar="N",
                     help="requests a minute it may make (default: %(default)s); past it, 429")
    with_json(command(at, "list", cmd_api_token_list, "list the API tokens (never the tokens)"))
    sub = command(at, "revoke", cmd_api_token_revoke, "revoke an API token at once")
    sub.add_argument("name", metavar="NAME")

    command(commands, "migrate", cmd_migrate,
            "bring the store's schema up to date (serve only checks it); back it up first")
    command(commands, "check-config", cmd_check_config, "validate the config file and exit")
    command(commands, "serve", cmd_serve, "run the proxy in the foreground")
    sub = command(commands, "demo", cmd_demo,
                  "run the proxy on its embedded default config, in a local folder")
    sub.add_argument("--folder", default="legacy-auth-proxy-demo",
                     help="where the demo keeps its config and state (default: %(default)s)")
    sub.add_argument("--no-serve", action="store_true",
                     help="set the demo up, print how to use it, and exit")
    sub.add_argument("--workers", default="1", metavar="auto|N",
                     help="worker processes under one supervisor (the config's workers; "
                          "default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    ctx = Context(args.config or configuration.default_path())
    try:
        return args.handler(ctx, args)
    except configuration.ConfigError as e:
        print(f"legacy-auth-proxy: bad config: {e}", file=sys.stderr)
        return EX_CONFIG
    except Failure as e:
        print(f"legacy-auth-proxy: {e}", file=sys.stderr)
        return e.code
    except StoreUnavailable as e:  # lost after it was opened
        print(f"legacy-auth-proxy: {e}; {TEMPORARY}", file=sys.stderr)
        return EX_TEMPFAIL
    except (AdminError, StoreError) as e:
        print(f"legacy-auth-proxy: {e}", file=sys.stderr)
        return EX_REFUSED
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.close()
