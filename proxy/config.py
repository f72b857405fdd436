"""The YAML config: parsed into frozen, validated objects.

The file is composed into PyYAML nodes first, so that every error can name
the file, the line and the dotted key, then walked against the schema below.
Each section is an attrs class whose fields carry their parser and their
documentation; docs/configuration.md describes the same keys, and a test keeps
the two in step. Nothing here starts, opens or creates anything.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import yaml
import yaml.constructor
import yaml.nodes

from proxy import protocols

DEFAULT_PATH = Path("/etc/legacy-auth-proxy/config.yaml")
ENVIRONMENT_VARIABLE = "LEGACY_AUTH_PROXY_CONFIG"


class ConfigError(Exception):
    """A config that cannot be used. The text names the file, line and key."""

    def __init__(self, source: Path | str, line: int | None, key: str, problem: str) -> None:
        self.source = str(source)
        self.line = line
        self.key = key
        self.problem = problem
        where = f"{self.source}:{line}" if line is not None else self.source
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


# -- parsers -----------------------------------------------------------------

_constructor = yaml.constructor.SafeConstructor()
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"


@attrs.frozen
class _Context:
    source: Path
    key: str
    node: yaml.nodes.Node

    def error(self, problem: str) -> ConfigError:
        return ConfigError(self.source, self.node.start_mark.line + 1, self.key, problem)

    def child(self, key: str, node: yaml.nodes.Node) -> _Context:
        return _Context(self.source, f"{self.key}.{key}" if self.key else key, node)


def _describe(node: yaml.nodes.Node) -> str:
    if isinstance(node, yaml.nodes.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.nodes.SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "nothing"
    text = node.value if len(node.value) <= 40 else node.value[:37] + "..."
    return repr(text)


def _scalar(ctx: _Context, tags: tuple[str, ...], expected: str) -> Any:
    node = ctx.node
    if not isinstance(node, yaml.nodes.ScalarNode) or node.tag not in tags:
        raise ctx.error(f"expected {expected}, got {_describe(node)}")
    return _constructor.construct_object(node)


class Bool:
    doc = "true or false"

    def __call__(self, ctx: _Context) -> bool:
        return _scalar(ctx, (_BOOL,), "true or false")


@attrs.frozen
class Int:
    low: int
    high: int

    @property
    def doc(self) -> str:
        return f"an integer from {self.low} to {self.high}"

    def __call__(self, ctx: _Context) -> int:
        value = _scalar(ctx, (_INT,), self.doc)
        if not self.low <= value <= self.high:
            raise ctx.error(f"expected {self.doc}, got {value}")
        return value


class Str:
    doc = "a string"

    def __call__(self, ctx: _Context) -> str:
        value = _scalar(ctx, (_STR,), "a string")
        if not value:
            raise ctx.error("expected a non-empty string")
        return value


class FilePath:
    """A path; a relative one is taken from the config file's folder."""

    doc = "a path (relative paths are taken from the config file's folder)"

    def __call__(self, ctx: _Context) -> Path:
        value = Path(Str()(ctx))
        return value if value.is_absolute() else (ctx.source.parent / value).absolute()


@attrs.frozen
class Optional:
    inner: Any

    @property
    def doc(self) -> str:
        return f"{self.inner.doc}, or null"

    def __call__(self, ctx: _Context) -> Any:
        if isinstance(ctx.node, yaml.nodes.ScalarNode) and ctx.node.tag == _NULL:
            return None
        return self.inner(ctx)


@attrs.frozen
class Duration:
    """Seconds as a number, or a number with a unit: ``90s``, ``15m``, ``3h``, ``2d``."""

    high: float = 10 * 365 * 86400

    doc = "a duration: seconds, or a number with s, m, h, d or w (for example 15m)"

    def __call__(self, ctx: _Context) -> float:
        node = ctx.node
        if isinstance(node, yaml.nodes.ScalarNode) and node.tag in (_INT, _FLOAT):
            value = float(_constructor.construct_object(node))
        else:
            try:
                value = parse_duration(_scalar(ctx, (_STR,), self.doc))
            except ValueError:
                raise ctx.error(f"expected {self.doc}, got {_describe(node)}") from None
        if not 0 <= value <= self.high:
            raise ctx.error(f"expected {self.doc}, between 0 and {self.high:g} seconds")
        return value


@attrs.frozen
class ListOf:
    inner: Any

    @property
    def doc(self) -> str:
        return f"a list, each {self.inner.doc}"

    def __call__(self, ctx: _Context) -> tuple[Any, ...]:
        node = ctx.node
        if not isinstance(node, yaml.nodes.SequenceNode):
            raise ctx.error(f"expected {self.doc}, got {_describe(node)}")
        return tuple(
            self.inner(_Context(ctx.source, f"{ctx.key}[{i}]", item))
            for i, item in enumerate(node.value)
        )


@attrs.frozen
class Choice:
    values: tuple[str, ...]

    @property
    def doc(self) -> str:
        return "one of " + ", ".join(self.values)

    def __call__(self, ctx: _Context) -> str:
        value = _scalar(ctx, (_STR,), self.doc)
        if value not in self.values:
            raise ctx.error(f"expected {self.doc}, got {value!r}")
        return value


class Endpoint:
    """A Twisted server endpoint string; TLS is the listener's own ``tls`` setting."""

    doc = (
        "a server endpoint: tcp:PORT[:interface=ADDRESS], tcp6:..., unix:PATH, "
        "or systemd:domain=INET:index=N"
    )
    KINDS = ("tcp", "tcp6", "unix", "systemd")

    def __call__(self, ctx: _Context) -> str:
        text = Str()(ctx)
        if text.split(":", 1)[0] not in self.KINDS or ":" not in text:
            raise ctx.error(f"expected {self.doc}, got {text!r}")
        return text


class Workers:
    """``auto`` (one process per core the daemon may run on) or a count."""

    doc = "auto (one worker process per core), or a number of worker processes from 1 to 256"

    def __call__(self, ctx: _Context) -> int | str:
        node = ctx.node
        if isinstance(node, yaml.nodes.ScalarNode) and node.tag == _STR and node.value == "auto":
            return "auto"
        if isinstance(node, yaml.nodes.ScalarNode) and node.tag == _INT:
            value = _constructor.construct_object(node)
            if 1 <= value <= 256:
                return value
        raise ctx.error(f"expected {self.doc}, got {_describe(node)}")


class Network:
    doc = "a network in CIDR form (192.0.2.0/24, 2001:db8::/32) or an address"

    def __call__(self, ctx: _Context) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        text = Str()(ctx)
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ctx.error(f"expected {self.doc}, got {text!r}") from None


class _Url:
    """A URL setting: ``doc`` says what is expected."""

    doc = "a URL"

    def _parts(self, ctx: _Context) -> tuple[str, urllib.parse.SplitResult]:
        """The text and its parts, a port that is not a number refused (the
        text not repeated if it holds a password)."""
        text = Str()(ctx)
        parts = urllib.parse.urlsplit(text)
        try:
            parts.port
        except ValueError:
            shown = "a URL with a password in it" if parts.password else repr(text)
            raise ctx.error(f"expected {self.doc}, got {shown}") from None
        return text, parts


class LdapUrl(_Url):
    doc = "an ldap:// or ldaps:// URL with a host and an optional port"

    def __call__(self, ctx: _Context) -> str:
        text, parts = self._parts(ctx)
        if (
            parts.scheme not in ("ldap", "ldaps")
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.username
        ):
            raise ctx.error(f"expected {self.doc}, got {text!r}")
        return text


class BackendUrl(_Url):
    doc = ", ".join(f"{scheme}://" for scheme in protocols.BACKEND_PORTS) + \
        " with a host and an optional port"

    def __call__(self, ctx: _Context) -> str:
        text, parts = self._parts(ctx)
        if parts.scheme not in protocols.BACKEND_PORTS or not parts.hostname or (
            parts.path not in ("", "/")
        ):
            raise ctx.error(f"expected {self.doc}, got {text!r}")
        return text


class Dn:
    doc = "a distinguished name (cn=proxy,dc=example,dc=com)"

    def __call__(self, ctx: _Context) -> str:
        from ldaptor.protocols.ldap.distinguishedname import DistinguishedName

        text = Str()(ctx)
        try:
            DistinguishedName(text)
        except Exception:
            raise ctx.error(f"expected {self.doc}, got {text!r}") from None
        if "=" not in text:
            raise ctx.error(f"expected {self.doc}, got {text!r}")
        return text


@attrs.frozen
class LdapFilter:
    """An RFC 4515 filter, optionally with a ``{username}`` placeholder."""

    placeholder: bool = False

    @property
    def doc(self) -> str:
        if self.placeholder:
            return "an LDAP filter containing {username}, such as (uid={username})"
        return "an LDAP filter, such as (!(pwdAccountLockedTime=*))"

    def __call__(self, ctx: _Context) -> str:
        from ldaptor.ldapfilter import InvalidLDAPFilter, parseFilter

        text = Str()(ctx)
        if self.placeholder and "{username}" not in text:
            raise ctx.error(f"expected {self.doc}; {{username}} is missing")
        try:
            parseFilter(text.replace("{username}", "x") if self.placeholder else text)
        except (InvalidLDAPFilter, Exception):
            raise ctx.error(f"expected {self.doc}, got {text!r}") from None
        return text


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """``90`` or ``90s``, ``15m``, ``3h``, ``2d``, ``1w`` → seconds."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"not a duration: {text!r}")
    return float(match[1]) * _UNITS[(match[2] or "s").lower()]


def parse_expiry(text: str, now: float) -> float:
    """An expiry given on the command line: a duration from now (``90d``), a
    date (``2027-01-31``, midnight UTC) or an ISO 8601 time. Returns a POSIX
    timestamp."""
    try:
        return now + parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"not a duration (90d, 12h) or a date (2027-01-31): {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _field(default: Any, parse: Any, doc: str) -> Any:
    return attrs.field(default=default, metadata={"parse": parse, "doc": doc})


def _section(cls: type) -> Any:
    return attrs.field(factory=cls, metadata={"parse": Section(cls), "doc": cls.__doc__})


def _optional_section(cls: type) -> Any:
    return attrs.field(
        default=None, metadata={"parse": Optional(Section(cls)), "doc": cls.__doc__}
    )


def _required(parse: Any, doc: str) -> Any:
    return attrs.field(metadata={"parse": parse, "doc": doc})


@attrs.frozen
class Section:
    cls: type

    doc = "a mapping"

    def __call__(self, ctx: _Context) -> Any:
        node = ctx.node
        if isinstance(node, yaml.nodes.ScalarNode) and node.tag == _NULL:
            return self.cls()
        if not isinstance(node, yaml.nodes.MappingNode):
            raise ctx.error(f"expected a mapping of settings, got {_describe(node)}")
        fields = {
            f.name: f for f in attrs.fields(self.cls) if not f.metadata.get("internal")
        }
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.nodes.ScalarNode) or key_node.tag != _STR:
                raise _Context(ctx.source, ctx.key, key_node).error(
                    f"expected a setting name, got {_describe(key_node)}"
                )
            name = key_node.value
            child = ctx.child(name, key_node)
            if name in values:
                raise child.error("set twice in the same section")
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                known = ", ".join(sorted(fields))
                raise child.error(f"unknown setting (known here: {known}){hint}")
            values[name] = fields[name].metadata["parse"](ctx.child(name, value_node))
        for name, f in fields.items():
            if f.default is attrs.NOTHING and name not in values:
                raise ctx.error(f"the setting {name!r} is required here")
        try:
            return self.cls(**values)
        except ValueError as e:
            raise ctx.error(str(e)) from None


# -- schema ------------------------------------------------------------------

STATE_DIR = Path("/var/lib/legacy-auth-proxy")
LOGS_DIR = Path("/var/log/legacy-auth-proxy")


class HttpUrl(_Url):
    doc = "an https:// URL (http:// only to a loopback address)"

    def __call__(self, ctx: _Context) -> str:
        text, parts = self._parts(ctx)
        if parts.username or parts.password:
            raise ctx.error("a URL with credentials in it: put the secret in its own file")
        loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
        if not parts.hostname or not (parts.scheme == "https" or (parts.scheme == "http" and loopback)):
            raise ctx.error(f"expected {self.doc}, got {text!r}")
        return text


class PostgresUrl:
    doc = "a postgresql://user@host[:port]/database URL (libpq's), without a password"

    def __call__(self, ctx: _Context) -> str:
        text = Str()(ctx)
        parts = urllib.parse.urlsplit(text)
        if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
            raise ctx.error(f"expected {self.doc}, got {parts.scheme or text[:20]!r}...")
        if parts.password or "password=" in parts.query:
            raise ctx.error("the URL holds a password: put it in store.password_file")
        return text


@attrs.frozen
class StoreConfig:
    """Where app passwords and users' cloud state are kept."""

    url: str | None = _field(
        None,
        Optional(PostgresUrl()),
        "a shared PostgreSQL store for a fleet: postgresql://user@host:5432/database"
        "?sslmode=verify-full; null: the SQLite file at path",
    )
    password_file: Path | None = _field(
        None, Optional(FilePath()), "with url, a file holding the database user's password"
    )
    pool_size: int = _field(
        4, Int(1, 100), "with url, connections to PostgreSQL (and threads that use them)"
    )
    timeout: float = _field(
        5.0, Duration(high=120), "with url, the longest a connection or a query may take"
    )
    path: Path = _field(
        STATE_DIR / "store.sqlite3", FilePath(), "the SQLite database file (when url is null)"
    )
    pepper_file: Path = _field(
        STATE_DIR / "pepper",
        FilePath(),
        "the 32-byte secret key of the lookup HMAC; created (mode 0600) on first use, "
        "refused if anyone but its owner can read it; keep it out of the database's backups",
    )
    totp_key_file: Path | None = _field(
        None,
        Optional(FilePath()),
        "the 32-byte key that seals users' TOTP keys (the portal's second factor) in the "
        "store; created (mode 0600) on first use, kept like the pepper; null: totp-key "
        "beside the pepper file",
    )

    @property
    def totp_key_path(self) -> Path:
        return self.totp_key_file or self.pepper_file.parent / "totp-key"


@attrs.frozen
class PolicyConfig:
    """The operator's switches over app passwords and legacy authentication."""

    allow_user_app_passwords: bool = _field(
        False,
        Bool(),
        "whether users may create and delete their own app passwords; turning it off "
        "leaves existing app passwords working",
    )
    block_legacy_auth: bool = _field(
        False,
        Bool(),
        "refuse every legacy sign-in, app passwords included",
    )
    max_app_passwords_per_user: int = _field(
        40, Int(1, 1000), "the most app passwords one user may hold at once"
    )
    revoke_app_passwords_on_password_change: bool = _field(
        True,
        Bool(),
        "stop a user's app passwords when the directory reports a primary password "
        "change made after they were created (they are listed as stopped for 30 days); "
        "false: they are refused but stay listed as working",
    )
    app_password_idle_expiry: float | None = _field(
        None,
        Optional(Duration()),
        "an app password unused this long stops working (listed as stopped for 30 days), "
        "for example 90d; null: never",
    )


@attrs.frozen
class HashingConfig:
    """argon2id parameters and the pool that runs it off the reactor."""

    time_cost: int = _field(2, Int(1, 100), "argon2id passes over memory")
    memory_kib: int = _field(19456, Int(8, 4 * 1024 * 1024), "argon2id memory in KiB")
    parallelism: int = _field(1, Int(1, 64), "argon2id lanes")
    threads: int = _field(
        0, Int(0, 256), "threads that run argon2; 0 means one per CPU core"
    )
    queue: int = _field(
        64,
        Int(1, 100_000),
        "checks that may wait for a hashing thread; beyond this a sign-in gets a "
        "temporary failure at once",
    )

    @property
    def thread_count(self) -> int:
        return self.threads or os.cpu_count() or 1


# What ``directory.kind`` sets, for the keys an operator leaves out: the
# filters and attributes that are easy to get subtly wrong by hand.
DIRECTORY_PRESETS: dict[str, dict[str, str | None]] = {
    "openldap": {
        "user_filter": "(&(objectClass=inetOrgPerson)(|(uid={username})(mail={username})))",
        "username_attribute": "uid",
        "active_filter": "(!(pwdAccountLockedTime=*))",
        "member_of_attribute": "memberOf",
        "mail_attribute": "mail",
        "password_changed_attribute": "pwdChangedTime",
        "app_password_reads": "proxied_authorization",
    },
    "active_directory": {
        # sAMAccountName, the UPN (its own suffix or an alternative one) and
        # mail; DOMAIN\sam and sam@<the domain's DNS name> are reduced to
        # sAMAccountName by the directory client before this is filled in.
        "user_filter": "(&(objectCategory=person)(objectClass=user)"
                       "(|(sAMAccountName={username})(userPrincipalName={username})"
                       "(mail={username})))",
        "username_attribute": "sAMAccountName",
        # Read from userAccountControl, lockoutTime and accountExpires by the
        # directory client, which knows the domain's lockout duration.
        "active_filter": None,
        "member_of_attribute": "memberOf",
        "mail_attribute": "mail",
        "password_changed_attribute": "pwdLastSet",
        # AD has no proxied authorization (RFC 4370): a search account.
        "app_password_reads": "search_account",
    },
}


def _preset(key: str) -> Any:
    """The default of ``key``: the value ``kind`` (a field declared before it) sets."""
    return attrs.Factory(lambda self: DIRECTORY_PRESETS[self.kind][key], takes_self=True)


@attrs.frozen
class DirectoryConfig:
    """The upstream directory (OpenLDAP, Active Directory): accounts, groups, primary passwords."""

    url: str = _required(LdapUrl(), "the directory: ldap://host[:port] or ldaps://host[:port]")
    bind_dn: str = _required(Dn(), "the service account that searches for users")
    bind_password_file: Path = _required(
        FilePath(), "a file holding the service account's password (trailing newline ignored)"
    )
    user_base: str = _required(Dn(), "where users are searched for (the whole subtree)")
    start_tls: bool = _field(
        True, Bool(), "upgrade ldap:// connections with StartTLS; ignored for ldaps://"
    )
    ca_file: Path | None = _field(
        None,
        Optional(FilePath()),
        "PEM certificates to trust for the directory's certificate; null: the system's",
    )
    kind: str = _field(
        "openldap",
        Choice(tuple(DIRECTORY_PRESETS)),
        "what the directory is: openldap, or active_directory (sign-in names in every form AD "
        "takes, account state from userAccountControl, lockoutTime, accountExpires and "
        "pwdLastSet, nested groups); sets the defaults of the keys below",
    )
    netbios_domain: str | None = _field(
        None,
        Optional(Str()),
        "Active Directory: the domain's NetBIOS name, stripped from DOMAIN\\user sign-in names "
        "(any case); null: read from the directory",
    )
    user_filter: str = _field(
        _preset("user_filter"),
        LdapFilter(placeholder=True),
        "finds a user by the name a client signs in with; {username} is escaped (RFC 4515). "
        "A client may also sign in with the user's full DN",
    )
    username_attribute: str = _field(
        _preset("username_attribute"),
        Str(),
        "the attribute whose value names the user in the app-password store "
        "(uid, sAMAccountName, userPrincipalName)",
    )
    active_filter: str | None = _field(
        _preset("active_filter"),
        Optional(LdapFilter()),
        "an account that does not match is inactive and refused on every path; "
        "null: every account found (active_directory reads the account's state itself)",
    )
    member_of_attribute: str = _field(
        _preset("member_of_attribute"),
        Str(),
        "the user's attribute that lists the DNs of their groups",
    )
    mfa_group: str | None = _field(
        None, Optional(Dn()), "members are MFA-enforced, whatever the store says"
    )
    modern_auth_only_group: str | None = _field(
        None, Optional(Dn()), "members may not sign in over legacy protocols at all"
    )
    admin_group: str | None = _field(
        None,
        Optional(Dn()),
        "members are administrators: app passwords never act as them; the portal's help desk "
        "is theirs",
    )
    mail_attribute: str = _field(
        _preset("mail_attribute"), Str(), "the user's mail address, where the portal's notifications go"
    )
    password_changed_attribute: str | None = _field(
        _preset("password_changed_attribute"),
        Optional(Str()),
        "when the primary password last changed: pwdChangedTime (GeneralizedTime) or "
        "pwdLastSet (Active Directory's FILETIME); null: not tracked",
    )
    timeout: float = _field(5.0, Duration(high=300), "the longest any directory operation may take")
    pool_size: int = _field(
        4, Int(1, 64), "persistent connections for searches, and as many for password checks"
    )
    account_cache: float = _field(
        30.0,
        Duration(high=86400),
        "how long an account looked up in the directory is trusted; an account deleted or "
        "disabled there is refused within this time; 0: ask the directory every time",
    )
    outage_grace: float = _field(
        3600.0,
        Duration(),
        "while the directory is unreachable, app passwords keep working on cloud listeners "
        "for accounts seen active within this long; 0: not at all",
    )
    app_password_reads: str = _field(
        _preset("app_password_reads"),
        Choice(("proxied_authorization", "search_account")),
        "with whose rights an LDAP session opened with an app password reads the directory: "
        "proxied_authorization (the service account's connection, every request carrying "
        "RFC 4370's proxied authorization control for the user: the user's own rights); "
        "search_account (bound as search_bind_dn, an account with no more rights than a user; "
        "the only choice with kind: active_directory, which has no proxied authorization)",
    )
    search_bind_dn: str | None = _field(
        None, Optional(Dn()), "with app_password_reads: search_account, the account to read as"
    )
    search_bind_password_file: Path | None = _field(
        None, Optional(FilePath()), "a file holding search_bind_dn's password"
    )

    def __attrs_post_init__(self) -> None:
        if self.kind == "active_directory" and self.app_password_reads != "search_account":
            raise ValueError(
                "app_password_reads: Active Directory has no proxied authorization (RFC 4370); "
                "use search_account (the default with kind: active_directory) and search_bind_dn"
            )

    @property
    def search_account_missing(self) -> bool:
        """LDAP sessions opened with app passwords would read as a search
        account that is not configured (only LDAP listeners need one)."""
        return self.app_password_reads == "search_account" and (
            self.search_bind_dn is None or self.search_bind_password_file is None)


@attrs.frozen
class ThrottleConfig:
    """Failed sign-ins: locking accounts and slowing sources, before any expensive work."""

    account_failures: int = _field(
        10, Int(1, 10_000), "distinct wrong secrets for an account before it is locked"
    )
    ignore_repeats: int = _field(
        3,
        Int(0, 100),
        "a wrong secret equal to one of this many last ones does not count again "
        "(a phone retrying a stale password)",
    )
    failure_window: float = _field(
        900.0, Duration(), "failures older than this are forgotten"
    )
    lockout: float = _field(60.0, Duration(), "the first lockout's length")
    lockout_max: float = _field(
        900.0, Duration(), "lockouts double on repeat up to this length"
    )
    source_delay: float = _field(
        2.0, Duration(high=600), "the delay of a failure answer to a source, at first"
    )
    source_delay_max: float = _field(
        15.0, Duration(high=600), "failure answers to a source double their delay up to this"
    )
    ipv6_prefix: int = _field(48, Int(1, 128), "IPv6 sources are counted per this prefix")
    trusted_networks: tuple[Any, ...] = _field(
        (), ListOf(Network()), "sources exempt from throttling (monitoring, internal relays)"
    )
    shared: bool | None = _field(
        None,
        Optional(Bool()),
        "count failures in the store as well, so that every process sharing it locks an "
        "account alike; null: with a PostgreSQL store (store.url) or several workers only",
    )


@attrs.frozen
class CacheConfig:
    """Successful checks kept in memory, keyed by an HMAC (never the secret)."""

    app_password_ttl: float = _field(
        900.0,
        Duration(high=86400),
        "how long a verified app password is trusted without argon2; 0: no cache",
    )
    primary_password_ttl: float = _field(
        0.0,
        Duration(high=86400),
        "how long a primary password the directory accepted is trusted; 0 (default): "
        "ask the directory every time",
    )
    max_entries: int = _field(100_000, Int(1, 10_000_000), "the most entries of each cache")
    last_used_interval: float = _field(
        60.0,
        Duration(high=86400),
        "the most often an app password's last use is written to the store",
    )


@attrs.frozen
class LimitsConfig:
    """What the daemon holds, over all its listeners, for clients that have not signed in."""

    max_connections_before_login: int = _field(
        10_000,
        Int(1, 10_000_000),
        "connections not yet signed in, over all listeners; more are refused at once",
    )
    max_connections: int = _field(
        50_000,
        Int(1, 10_000_000),
        "client connections, signed in or not, over all listeners; more are refused at once",
    )
    max_sessions_per_user_and_source: int = _field(
        10,
        Int(1, 100_000),
        "signed-in sessions one user may hold from one address (Dovecot's "
        "mail_max_userip_connections); one more gets a temporary failure",
    )
    max_bytes_before_login: int = _field(
        64 * 1024 * 1024,
        Int(1 << 20, 1 << 40),
        "bytes of unfinished commands and messages held for clients not yet signed in, over "
        "all listeners; a connection that would take it past this is closed",
    )


@attrs.frozen
class ShutdownConfig:
    """What SIGTERM does: stop taking connections, let sessions finish, then say goodbye."""

    grace: float = _field(
        10.0,
        Duration(high=3600),
        "how long signed-in sessions may go on after SIGTERM before they are told goodbye "
        "(IMAP BYE, SMTP 421, POP3 -ERR, LDAP notice of disconnection) and closed",
    )


@attrs.frozen
class MetricsConfig:
    """Prometheus metrics and health answers for load balancers, over HTTP."""

    endpoint: str | None = _field(
        None,
        Optional(Endpoint()),
        "where to serve /metrics, /health/live and /health/ready "
        "(tcp:9464:interface=127.0.0.1); null: nowhere",
    )


class MailRelay(_Url):
    doc = "smtp://host[:port] (no TLS: a relay on this host or a trusted network) or smtps://host[:port]"

    def __call__(self, ctx: _Context) -> str:
        text, parts = self._parts(ctx)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname or parts.path not in ("", "/"):
            raise ctx.error(f"expected {self.doc}, got {text!r}")
        return text


@attrs.frozen
class OidcConfig:
    """Signing in to the portal through the organisation's identity provider
    (OpenID Connect, authorization code with PKCE) instead of a password and
    a TOTP code. Read at start: a change needs a restart."""

    issuer: str = _required(
        HttpUrl(), "the provider's issuer, as its ID tokens name it (https://login.example.com); "
        "its /.well-known/openid-configuration is read")
    client_id: str = _required(Str(), "the portal's client id at the provider")
    client_secret_file: Path = _required(FilePath(), "a file holding the client's secret")
    ca_file: Path | None = _field(
        None, Optional(FilePath()), "certificates to trust for the provider (PEM); null: the system's")
    scope: str = _field("openid profile email", Str(), "the scopes asked for (openid among them)")
    username_claim: str = _field(
        "preferred_username", Str(),
        "the ID token's claim that names the user; its value is looked up in the directory as a "
        "typed sign-in name is (uid, sAMAccountName, UPN, mail)")
    username_domain: str | None = _field(
        None, Optional(Str()),
        "if set, the claim must end in @DOMAIN, which is removed before the directory lookup")
    mfa_acr: tuple[str, ...] = _field(
        (), ListOf(Str()), "acr values that count as multi-factor")
    mfa_amr: tuple[str, ...] = _field(
        (), ListOf(Str()),
        "amr values that count as multi-factor; with mfa_acr both empty, every sign-in at the "
        "provider counts (it enforces MFA itself), else one that matches neither is refused")
    acr_values: str | None = _field(
        None, Optional(Str()), "acr_values asked of the provider at every sign-in; null: none")
    provider_name: str = _field(
        "your organisation's account", Str(), "how the sign-in button names the provider")
    timeout: float = _field(
        10.0, Duration(high=120), "the longest a request to the provider may take")

    def __attrs_post_init__(self) -> None:
        if "openid" not in self.scope.split():
            raise ValueError("scope must include openid")
        if self.username_domain is not None and "@" in self.username_domain:
            raise ValueError("username_domain is a domain (example.com), without @")


@attrs.frozen
class PortalConfig:
    """The self-service and help-desk web pages, over HTTPS."""

    endpoint: str | None = _field(
        None,
        Optional(Endpoint()),
        "where to serve the portal (tcp:443:interface=192.0.2.1); null: no portal",
    )
    certificate: Path | None = _field(
        None, Optional(FilePath()), "the portal's certificate chain (PEM), leaf first; re-read on SIGHUP"
    )
    private_key: Path | None = _field(
        None, Optional(FilePath()), "the certificate's private key (PEM)"
    )
    title: str = _field(
        "Security info", Str(), "the name shown on every page and in authenticator apps"
    )
    session_idle: float = _field(
        900.0, Duration(high=86400), "a signed-in page session ends after this long without a request"
    )
    session_max: float = _field(
        28800.0, Duration(high=7 * 86400), "a signed-in page session ends this long after sign-in"
    )
    mail_relay: str | None = _field(
        None,
        Optional(MailRelay()),
        "where to send notifications (smtp://127.0.0.1:25); null: none are sent",
    )
    mail_from: str = _field(
        "legacy-auth-proxy@localhost", Str(), "the sender of notifications"
    )
    notify_on_create: bool = _field(
        True,
        Bool(),
        "mail users when an app password is made for them (needs mail_relay and the "
        "directory's mail attribute)",
    )
    help_desk_app_passwords: bool = _field(
        False,
        Bool(),
        "the help desk may create app passwords for users, and so see their secrets (and "
        "read and send their mail); each user is told by mail and on their page, and it is "
        "audited",
    )
    proxy_protocol: bool = _field(
        False,
        Bool(),
        "connections start with a load balancer's PROXY header naming the real client "
        "(as listeners' proxy_protocol)",
    )
    trusted_proxies: tuple[Any, ...] = _field(
        (), ListOf(Network()), "with proxy_protocol, the load balancers' addresses (CIDR)"
    )
    audit_scan_bytes: int = _field(
        16 * 1024 * 1024,
        Int(0, 1 << 34),
        "how much of the end of the audit file the help desk's page reads for a user's "
        "recent refusals",
    )
    fresh_check: float = _field(
        300.0, Duration(high=3600),
        "creating an app password and every help-desk action need a sign-in (a new code, or "
        "a new sign-in at the provider) no older than this, whatever the page session's age",
    )
    passkeys_origin: str | None = _field(
        None, Optional(HttpUrl()),
        "the portal's address as users' browsers reach it (https://security.example.org): "
        "passkeys are bound to its host name; null: no passkeys",
    )
    oidc: OidcConfig | None = _optional_section(OidcConfig)

    def __attrs_post_init__(self) -> None:
        if self.passkeys_origin is not None and urllib.parse.urlsplit(
                self.passkeys_origin).path not in ("", "/"):
            raise ValueError("passkeys_origin is an origin (https://host[:port]), without a path")
        if self.endpoint is not None and (self.certificate is None or self.private_key is None):
            raise ValueError("a portal endpoint needs certificate and private_key (it serves HTTPS only)")
        if self.session_max < self.session_idle:
            raise ValueError("session_max must be at least session_idle")
        if self.proxy_protocol != bool(self.trusted_proxies):
            raise ValueError("proxy_protocol and trusted_proxies go together")
        if self.fresh_check < 30:
            raise ValueError("fresh_check must be at least 30s: a sign-in takes that long")


@attrs.frozen
class ListenerConfig:
    """One service legacy clients connect to."""

    protocol: str = _required(Choice(protocols.NAMES), "what the listener speaks")
    realm: str = _required(
        Choice(("cloud", "on-premises")),
        "cloud: app passwords (and primary passwords of users not required to use MFA); "
        "on-premises: primary passwords only",
    )
    endpoint: str = _required(Endpoint(), "where to listen: tcp:636:interface=192.0.2.1")
    name: str | None = _field(None, Optional(Str()), "a name for logs; default: protocol and endpoint")
    tls: str = _field(
        "starttls",
        Choice(("starttls", "implicit", "none")),
        "starttls: plain connections upgraded on request (LDAP's StartTLS, IMAP's and SMTP's "
        "STARTTLS); implicit: TLS from the first byte (LDAPS, IMAPS, submissions); none",
    )
    certificate: Path | None = _field(
        None, Optional(FilePath()), "the certificate chain (PEM), leaf first; re-read on SIGHUP"
    )
    private_key: Path | None = _field(
        None, Optional(FilePath()), "the certificate's private key (PEM); re-read on SIGHUP"
    )
    allow_plaintext_auth: bool = _field(
        False, Bool(), "accept sign-ins on connections that are not encrypted"
    )
    allow_anonymous: bool = _field(
        False, Bool(), "LDAP: accept anonymous binds (relayed to the directory as anonymous)"
    )
    login_timeout: float = _field(
        60.0, Duration(high=3600), "close connections that have not signed in after this long idle"
    )
    idle_timeout: float = _field(
        1800.0, Duration(), "close signed-in connections idle this long in both directions"
    )
    max_connections_per_source: int = _field(
        100, Int(1, 1_000_000), "connections one client address may hold at once"
    )
    proxy_protocol: bool = _field(
        False,
        Bool(),
        "connections start with a load balancer's PROXY header (HAProxy's send-proxy or "
        "send-proxy-v2), naming the real client: its address drives throttling, audit and "
        "what the backend is told",
    )
    trusted_proxies: tuple[Any, ...] = _field(
        (),
        ListOf(Network()),
        "with proxy_protocol, the load balancers' addresses (CIDR); a connection from "
        "anywhere else is closed unread",
    )
    reuse_port: bool = _field(
        False,
        Bool(),
        "tcp and tcp6 endpoints: listen with SO_REUSEPORT, so that several processes on one "
        "host serve the same port and the kernel spreads connections over them",
    )
    max_message_size_before_bind: int = _field(
        262144, Int(1024, 1 << 30), "LDAP: the largest message in bytes before a bind succeeds"
    )
    max_message_size: int = _field(
        4194304, Int(1024, 1 << 30), "LDAP: the largest message in bytes after a bind"
    )
    max_ber_depth: int = _field(32, Int(4, 1000), "LDAP: the deepest nesting of a message")
    max_line_length: int = _field(
        8192, Int(512, 1 << 20), "IMAP, POP3, SMTP: the longest command line before login"
    )
    max_literal_size: int = _field(
        4096, Int(64, 1 << 20), "IMAP: the largest literal before login"
    )
    max_bad_commands: int | None = _field(
        None,
        Optional(Int(1, 1000)),
        "IMAP, POP3, SMTP: invalid commands before login after which the client is dropped; "
        "null: 3 for IMAP and POP3, 20 for SMTP (Postfix's hard error limit)",
    )
    backend: str | None = _field(
        None,
        Optional(BackendUrl()),
        "IMAP, POP3, SMTP: the real server: imap://host:port, imaps://, pop3://, pop3s://, "
        "smtp://host:port (submission), smtps://host:port",
    )
    backend_starttls: bool = _field(
        False, Bool(), "IMAP, POP3, SMTP: upgrade the connection to the backend with STARTTLS"
    )
    backend_ca_file: Path | None = _field(
        None, Optional(FilePath()), "IMAP, POP3, SMTP: certificates to trust for the backend; null: the system's"
    )
    backend_timeout: float = _field(
        30.0, Duration(high=600), "IMAP, POP3, SMTP: the longest the backend may take to log a user in"
    )
    backend_pool: int = _field(
        4, Int(0, 64), "IMAP, POP3, SMTP: connections to the backend opened and greeted ahead of "
        "logins (a login then costs one round trip to it); 0: a new connection for every login"
    )
    backend_pool_max_age: float = _field(
        30.0, Duration(high=600), "IMAP, POP3, SMTP: how long a pooled connection waits "
        "for a login; keep it below the backend's timeout for clients that do not log in "
        "(Dovecot: 3 minutes; Postfix: smtpd_timeout, 10 s under stress)"
    )
    backend_login: str = _field(
        "sasl",
        Choice(("sasl", "dovecot", "xclient", "oauth2")),
        "how the proxy logs in as the user: sasl (SASL PLAIN with the user as authorization "
        "identity), dovecot (IMAP LOGIN, POP3 USER: user*master), xclient (SMTP: Postfix "
        "XCLIENT LOGIN=), oauth2 (SASL XOAUTH2 or OAUTHBEARER as the user, with an access "
        "token of the proxy's app registration: the oauth2_ keys)",
    )
    oauth2_token_url: str | None = _field(
        None, Optional(HttpUrl()), "backend_login: oauth2: the identity provider's token endpoint"
    )
    oauth2_client_id: str | None = _field(
        None, Optional(Str()), "backend_login: oauth2: the proxy's app registration (client id)"
    )
    oauth2_client_secret_file: Path | None = _field(
        None, Optional(FilePath()), "backend_login: oauth2: a file holding the client's secret"
    )
    oauth2_scope: str | None = _field(
        None, Optional(Str()), "backend_login: oauth2: the scope asked for; null: none"
    )
    oauth2_client_auth: str = _field(
        "client_secret_basic",
        Choice(("client_secret_basic", "client_secret_post")),
        "backend_login: oauth2: how the secret is sent to the token endpoint",
    )
    oauth2_mechanism: str = _field(
        "xoauth2", Choice(("xoauth2", "oauthbearer")),
        "backend_login: oauth2: the SASL mechanism the backend takes",
    )
    oauth2_ca_file: Path | None = _field(
        None, Optional(FilePath()), "backend_login: oauth2: certificates to trust for the token "
        "endpoint; null: the system's",
    )
    master_user: str | None = _field(
        None, Optional(Str()), "IMAP, POP3, SMTP: the master user the backend trusts"
    )
    master_password_file: Path | None = _field(
        None, Optional(FilePath()), "IMAP, POP3, SMTP: a file holding the master user's password"
    )
    pass_client_address: bool = _field(
        True,
        Bool(),
        "IMAP, POP3, SMTP: tell the backend the client's address (IMAP ID x-originating-ip, "
        "SMTP XCLIENT ADDR); the backend must trust the proxy for it",
    )

    def __attrs_post_init__(self) -> None:
        if self.tls != "none" and (self.certificate is None or self.private_key is None):
            raise ValueError(f"tls: {self.tls} needs certificate and private_key")
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError("proxy_protocol needs trusted_proxies: the balancers' addresses")
        if self.trusted_proxies and not self.proxy_protocol:
            raise ValueError("trusted_proxies is only for proxy_protocol: true")
        if self.reuse_port and self.endpoint.split(":", 1)[0] not in ("tcp", "tcp6"):
            raise ValueError("reuse_port is only for tcp: and tcp6: endpoints")
        entry = protocols.REGISTRY[self.protocol]
        own = set(protocols.COMMON_SETTINGS) | set(entry.settings)
        for f in attrs.fields(type(self)):
            if f.name not in own and getattr(self, f.name) != f.default:
                raise ValueError(f"{f.name} is not a setting of {self.protocol} listeners")
        if entry.backend is not None:
            if self.backend is None:
                raise ValueError(f"a {self.protocol} listener needs a backend")
            scheme = self.backend.split(":", 1)[0]
            if scheme not in entry.backend_ports:
                raise ValueError(f"a {self.protocol} listener needs a "
                                 f"{' or '.join(s + '://' for s in entry.backend_ports)} backend")
            if self.backend_login not in entry.backend_logins:
                raise ValueError(f"backend_login: {self.backend_login} is not for {self.protocol}")
            oauth2 = [f.name for f in attrs.fields(type(self)) if f.name.startswith("oauth2_")
                      and getattr(self, f.name) != f.default]
            if self.backend_login == "oauth2":
                missing = [k for k in ("oauth2_token_url", "oauth2_client_id", "oauth2_client_secret_file")
                           if getattr(self, k) is None]
                if missing:
                    raise ValueError(f"backend_login: oauth2 needs {', '.join(missing)}")
                if self.master_user is not None or self.master_password_file is not None:
                    raise ValueError("backend_login: oauth2 logs in with a token: no master_user "
                                     "or master_password_file")
            elif oauth2:
                raise ValueError(f"{oauth2[0]} is only for backend_login: oauth2")
            elif self.backend_login != "xclient" and (
                self.master_user is None or self.master_password_file is None
            ):
                raise ValueError(f"backend_login: {self.backend_login} needs master_user and master_password_file")

    @property
    def label(self) -> str:
        return self.name or f"{self.protocol} {self.endpoint}"


@attrs.frozen
class OAuthConfig:
    """Clients that sign in with an OAuth 2.0 access token (SASL XOAUTH2 or
    OAUTHBEARER) on cloud IMAP, POP3 and submission listeners: JWTs checked
    against the identity provider's keys."""

    issuer: str = _required(HttpUrl(), "the provider's issuer, exactly as in its tokens' iss")
    audiences: tuple[str, ...] = _required(
        ListOf(Str()), "a token's aud must name one of these (the mail clients' registration)"
    )
    jwks_url: str = _required(HttpUrl(), "where the provider publishes its signing keys (JWKS)")
    username_claims: tuple[str, ...] = _field(
        ("preferred_username", "upn", "email"), ListOf(Str()),
        "the claims that name the user; one must be the name the client signs in with",
    )
    ca_file: Path | None = _field(
        None, Optional(FilePath()), "certificates to trust for jwks_url; null: the system's"
    )
    leeway: float = _field(30.0, Duration(high=300), "clock skew allowed for exp and nbf")

    def __attrs_post_init__(self) -> None:
        if not self.audiences:
            raise ValueError("audiences: name at least one")
        if not self.username_claims:
            raise ValueError("username_claims: name at least one")


@attrs.frozen
class AuditConfig:
    """The audit log: one JSON object a line, never a secret."""

    file: Path | None = _field(
        LOGS_DIR / "audit.log",
        Optional(FilePath()),
        "the file audit events are appended to; null to send them to the daemon's log only",
    )
    log_authentications: bool = _field(
        False,
        Bool(),
        "also send every authentication event to the daemon's log (the file has them all; "
        "the log always has a line for each failure)",
    )


class WebhookUrl(_Url):
    doc = "an http:// or https:// URL, with no user or password in it"

    def __call__(self, ctx: _Context) -> str:
        text, parts = self._parts(ctx)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ctx.error(f"expected {self.doc}")
        if parts.username or parts.password:
            raise ctx.error("the URL holds a user or password: the receiver checks the "
                            "signature made with secret_file instead")
        return text


class WebhookName:
    doc = "a name of letters, digits and . _ - (at most 64)"

    def __call__(self, ctx: _Context) -> str:
        text = Str()(ctx)
        if len(text) > 64 or not all(c.isascii() and (c.isalnum() or c in "._-") for c in text):
            raise ctx.error(f"expected {self.doc}, got {_describe(ctx.node)}")
        return text


@attrs.frozen
class WebhookConfig:
    """One receiver of audit events (docs/events.md)."""

    name: str = _required(WebhookName(), "names the webhook in the outbox, the metrics and the log")
    url: str = _required(WebhookUrl(), "where events are posted")
    secret_file: Path = _required(
        FilePath(), "a file holding the secret events are signed with (at least 16 bytes)")
    events: tuple[str, ...] = _field(
        ("*",), ListOf(Str()), "the audit events sent, by name; \"*\": every one")
    timeout: float = _field(10.0, Duration(high=300), "the longest one delivery may take")
    retry_initial: float = _field(
        1.0, Duration(high=3600), "the first retry's delay; it doubles on each failure")
    retry_max: float = _field(600.0, Duration(high=86400), "the longest delay between retries")
    give_up_after: float = _field(
        7 * 86400.0, Duration(), "an event not delivered this long after it happened is dropped")
    concurrency: int = _field(8, Int(1, 256), "users whose events are posted at once")
    ca_file: Path | None = _field(
        None, Optional(FilePath()), "https: certificates to trust for the receiver; null: the system's")

    def __attrs_post_init__(self) -> None:
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max must be at least retry_initial")
        if self.give_up_after and self.give_up_after < self.retry_max:
            raise ValueError("give_up_after must be at least retry_max")
        if self.timeout <= 0:
            raise ValueError("timeout must be more than 0")


@attrs.frozen
class Config:
    """The whole configuration, as read from one file."""

    source: Path = attrs.field(default=Path("<defaults>"), metadata={"internal": True})
    workers: int | str = _field(
        1,
        Workers(),
        "worker processes serving the listeners, under one supervisor (as nginx's "
        "worker_processes): auto for one per core; 1 runs one process, with no supervisor",
    )
    store: StoreConfig = _section(StoreConfig)
    policy: PolicyConfig = _section(PolicyConfig)
    hashing: HashingConfig = _section(HashingConfig)
    audit: AuditConfig = _section(AuditConfig)
    oauth: OAuthConfig | None = _optional_section(OAuthConfig)
    directory: DirectoryConfig | None = _optional_section(DirectoryConfig)
    throttle: ThrottleConfig = _section(ThrottleConfig)
    cache: CacheConfig = _section(CacheConfig)
    limits: LimitsConfig = _section(LimitsConfig)
    metrics: MetricsConfig = _section(MetricsConfig)
    portal: PortalConfig = _section(PortalConfig)
    shutdown: ShutdownConfig = _section(ShutdownConfig)
    listeners: tuple[ListenerConfig, ...] = attrs.field(
        default=(), metadata={"parse": ListOf(Section(ListenerConfig)), "doc": ListenerConfig.__doc__}
    )
    webhooks: tuple[WebhookConfig, ...] = attrs.field(
        default=(), metadata={"parse": ListOf(Section(WebhookConfig)), "doc": WebhookConfig.__doc__}
    )

    def __attrs_post_init__(self) -> None:
        if self.listeners and self.directory is None:
            raise ValueError("listeners need a directory section")
        if self.portal.endpoint is not None and self.directory is None:
            raise ValueError("the portal needs a directory section (users sign in with it)")
        names = [w.name for w in self.webhooks]
        if len(set(names)) != len(names):
            raise ValueError("webhooks: two have the same name")
        if self.directory is not None and self.directory.search_account_missing and any(
                listener.protocol == "ldap" for listener in self.listeners):
            raise ValueError(
                "directory.app_password_reads: search_account (the default with kind: "
                "active_directory) needs directory.search_bind_dn and search_bind_password_file "
                "for the ldap listeners: the account LDAP sessions opened with app passwords read as")
        if self.workers != 1:
            if self.throttle.shared is False:
                raise ValueError("workers: several processes need throttle.shared (null or "
                                 "true): a lockout made by one must hold in all")
            for i, listener in enumerate(self.listeners):
                if listener.endpoint.split(":", 1)[0] not in WORKER_ENDPOINTS:
                    raise ValueError(
                        f"listeners[{i}].endpoint: with workers, only tcp:, tcp6: and systemd: "
                        f"endpoints, opened once and shared by every worker; got "
                        f"{listener.endpoint!r}")


# What the supervisor of several workers opens once and hands to each.
WORKER_ENDPOINTS = ("tcp", "tcp6", "systemd")


def schema_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any]]:
    """Every documented key, dotted, with its field: for docs and their tests."""
    keys = []
    for f in attrs.fields(cls):
        if f.metadata.get("internal"):
            continue
        name = f"{prefix}{f.name}"
        parse = f.metadata["parse"]
        if isinstance(parse, Optional) and isinstance(parse.inner, Section):
            parse = parse.inner
        if isinstance(parse, ListOf) and isinstance(parse.inner, Section):
            keys.extend(schema_keys(parse.inner.cls, name + "[]."))
        elif isinstance(parse, Section):
            keys.extend(schema_keys(parse.cls, name + "."))
        else:
            keys.append((name, f))
    return keys


# -- loading -----------------------------------------------------------------


def default_path() -> Path:
    return Path(os.environ.get(ENVIRONMENT_VARIABLE) or DEFAULT_PATH)


def parse(text: str, source: Path) -> Config:
    """Validate a config's text; ``source`` is used for messages and relative paths."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(source, line, "", f"not valid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(source, None, "", f"not valid YAML: {e}") from None
    if root is None:
        return Config(source=source)
    sections = Section(Config)
    config = sections(_Context(source, "", root))
    return attrs.evolve(config, source=source)


def load(path: Path) -> Config:
    """Read and validate the config file at ``path``."""
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, None, "", "no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, "", "not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(path, None, "", f"cannot read: {e.strerror}") from None
    return parse(text, path)

