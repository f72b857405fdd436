"""The PostgreSQL store: one database shared by every proxy of a fleet.

The same interface, records and rules as :mod:`proxy.store.sqlite`, on
psycopg 3 with a bounded psycopg_pool of connections. Every method blocks:
the daemon calls them on its store pool, never on the reactor thread. Every
write is one transaction; the change feed is a table whose new rows are
announced with ``NOTIFY`` (:meth:`PostgresStore.listen`), so a deletion on
any node reaches every other node at once, and the table itself is what a
node reads after a reconnect, so nothing is missed.

Change-feed rows are numbered in the order their transactions commit (each
writer takes one advisory lock for the insert): a reader that has seen
number n has seen everything before it.

The schema is versioned like SQLite's (table ``schema_version``); an empty
database is created at the latest version, an older one is brought up to
date only by ``legacy-auth-proxy migrate``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import psycopg
from psycopg import errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from proxy.store import (
    API_TOKEN_COLUMNS,
    COLUMNS,
    STOPPED_KEPT,
    lockout_length,
    ApiToken,
    AppPassword,
    Change,
    ChangeKind,
    Conflict,
    LimitReached,
    MfaState,
    NameTaken,
    OUTBOX_COLUMNS,
    Reserved,
    PASSKEY_COLUMNS,
    OutboxEvent,
    OutboxStats,
    Passkey,
    PasskeyTaken,
    SchemaOutdated,
    SchemaTooNew,
    StoreError,
    StoreUnavailable,
    TokenNameTaken,
    User,
    api_token_from,
    app_password_from,
    outbox_event_from,
    passkey_from,
)
from proxy.store.sqlite import CHANGE_RETENTION, FAILURES_KEPT

CHANNEL = "legacy_auth_proxy_changes"
FEED_LOCK = 0x6C61705F66656564  # pg_advisory_xact_lock key of the change feed ("lap_feed")
OUTBOX_LOCK = 0x6C61705F6F757478  # and of the outbox's inserts ("lap_outx")

MIGRATIONS: tuple[str, ...] = (
    # 1: app passwords, users' cloud state and the change feed.
    """
    CREATE TABLE users (
        username          text PRIMARY KEY,
        mfa_state         text NOT NULL DEFAULT 'disabled'
                          CHECK (mfa_state IN ('disabled', 'enabled', 'enforced')),
        mfa_registered_at double precision,
        updated_at        double precision NOT NULL
    );
    CREATE TABLE app_passwords (
        id                 text PRIMARY KEY,
        username           text NOT NULL,
        name               text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
        lookup_key         bytea NOT NULL UNIQUE CHECK (length(lookup_key) = 32),
        password_hash      text NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
        created_at         double precision NOT NULL,
        created_by         text NOT NULL,
        expires_at         double precision,
        protocols          text,
        last_used_at       double precision,
        last_used_address  text,
        last_used_protocol text,
        use_count          bigint NOT NULL DEFAULT 0,
        UNIQUE (username, name)
    );
    CREATE TABLE changes (
        seq             bigserial PRIMARY KEY,
        at              double precision NOT NULL,
        username        text NOT NULL,
        kind            text NOT NULL,
        app_password_id text
    );
    CREATE INDEX changes_at ON changes (at);
    """,
    # 2: source networks; app passwords that stopped by themselves; TOTP.
    """
    ALTER TABLE app_passwords ADD COLUMN networks text;
    ALTER TABLE app_passwords ADD COLUMN stopped_at double precision;
    ALTER TABLE app_passwords ADD COLUMN stopped_reason text
        CHECK (stopped_reason IN ('expired', 'password_change', 'unused'));
    CREATE TABLE second_factors (
        username   text PRIMARY KEY,
        totp       bytea NOT NULL,
        created_at double precision NOT NULL,
        last_step  bigint NOT NULL DEFAULT 0
    );
    """,
    # 3: failed sign-ins and lockouts, shared by the fleet.
    """
    CREATE TABLE failures (
        account  text NOT NULL,
        familiar boolean NOT NULL,
        digest   bytea NOT NULL,
        at       double precision NOT NULL,
        PRIMARY KEY (account, familiar, digest)
    );
    CREATE TABLE lockouts (
        account  text NOT NULL,
        familiar boolean NOT NULL,
        count    integer NOT NULL,
        until    double precision NOT NULL,
        PRIMARY KEY (account, familiar)
    );
    """,
    # 4: the REST API's tokens, kept as keyed hashes (lookup keys) only.
    """
    CREATE TABLE api_tokens (
        name         text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64),
        lookup_key   bytea NOT NULL UNIQUE CHECK (length(lookup_key) = 32),
        scope        text NOT NULL CHECK (scope IN ('read', 'manage', 'helpdesk')),
        created_at   double precision NOT NULL,
        created_by   text NOT NULL,
        expires_at   double precision,
        rate         integer NOT NULL CHECK (rate > 0),
        last_used_at double precision
    );
    """,
    # 5: the outbox of events for webhooks and its lanes (see proxy/store/sqlite.py).
    """
    CREATE TABLE outbox (
        seq           bigserial PRIMARY KEY,
        webhook       text NOT NULL,
        lane          text NOT NULL,
        event         text NOT NULL,
        body          text NOT NULL,
        created_at    double precision NOT NULL,
        attempts      integer NOT NULL DEFAULT 0,
        last_error    text,
        delivered_at  double precision
    );
    CREATE INDEX outbox_waiting ON outbox (webhook, lane, seq) WHERE delivered_at IS NULL;
    CREATE INDEX outbox_delivered ON outbox (delivered_at) WHERE delivered_at IS NOT NULL;
    CREATE TABLE outbox_lanes (
        webhook       text NOT NULL,
        lane          text NOT NULL,
        head          bigint NOT NULL,
        next_at       double precision NOT NULL,
        claimed_by    text,
        claimed_until double precision,
        PRIMARY KEY (webhook, lane)
    );
    CREATE INDEX outbox_lanes_due ON outbox_lanes (webhook, next_at);
    """,
    # 6: users' passkeys for the portal (see proxy/store/sqlite.py).
    """
    CREATE TABLE passkeys (
        credential_id bytea PRIMARY KEY CHECK (length(credential_id) BETWEEN 1 AND 1023),
        username      text NOT NULL,
        name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
        credential    bytea NOT NULL,
        sign_count    bigint NOT NULL DEFAULT 0,
        created_at    double precision NOT NULL,
        last_used_at  double precision,
        UNIQUE (username, name)
    );
    """,
)


class _Watchdog:
    """Closes the socket of a connection whose call outlives its deadline.

    Server-side timeouts (statement_timeout) need a server that runs; TCP
    keepalives need a host that is gone. A server that is frozen (SIGSTOP, a
    VM paused, a disk stuck) answers neither, and libpq would wait forever:
    one thread here shuts such sockets down, so the waiting call fails and
    its thread is free."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[int, tuple[Any, float]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, conn: Any, timeout: float) -> int:
        token = id(conn)
        with self._lock:
            self._calls[token] = (conn, time.monotonic() + timeout)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="store-watchdog",
                                                daemon=True)
                self._thread.start()
        return token

    def done(self, token: int) -> None:
        with self._lock:
            self._calls.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            with self._lock:
                late = [c for c, deadline in self._calls.values() if deadline < now]
                for conn in late:
                    self._calls.pop(id(conn), None)
            for conn in late:
                try:
                    fd = conn.pgconn.socket
                    peer = socket.socket(fileno=os.dup(fd))
                    try:
                        peer.shutdown(socket.SHUT_RDWR)
                    finally:
                        peer.close()
                except Exception:
                    pass


_watchdog = _Watchdog()


def _what(error: Exception) -> str:
    """An error's words for an operator, never a query's parameters."""
    if isinstance(error, PoolTimeout):
        return "no connection to the database within the timeout (is it down?)"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.removeprefix("connection failed: ").replace("\n", " ")[:300]


# What libpq or the server says when a connection fails because the config
# is wrong, not the moment: the user, its password, the database, pg_hba.conf,
# TLS. Trying again cannot mend these (exit 78: systemd does not restart).
# Every other failure to connect (refused, timed out, a name that does not
# resolve, a server starting, stopping or out of connection slots) is taken
# as temporary: a wrong guess that way costs restarts with the reason in the
# log each time; the other way, a node that stays down after the database
# comes back. psycopg has no SQLSTATE for a connection that failed, so the
# words are matched: libpq's are English in Python (which sets no
# LC_MESSAGES), the server's are in its lc_messages (English by default).
_CONFIGURATION_WORDS = (
    "authentication failed",  # password, SCRAM, md5, ident, peer, PAM, certificate
    "no pg_hba.conf entry",
    "does not exist",  # the database or the role
    "is not permitted to log in",
    "permission denied",  # no CONNECT on the database
    "no password supplied",  # the server asks for one: store.password_file
    "SSL was required",
    "certificate",  # verify failed, a CA file that cannot be read
    "invalid",  # a value in the URL (sslmode=...) libpq does not take
)


def unavailable(error: Exception) -> bool:
    """Whether a failure to connect is temporary: the store cannot be reached
    now, and trying again later may work."""
    if isinstance(error, PoolTimeout):
        return True
    if not isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
        return False  # a malformed URL, an unknown option: the config
    text = str(error).lower()
    return not any(words.lower() in text for words in _CONFIGURATION_WORDS)


class _Counts:
    """Failures counted by every process sharing the store, and the lockouts
    they decide: part of :class:`PostgresStore`."""

    def add_failure(self, account: str, familiar: bool, digest: bytes, now: float, *,
                    window: float, limit: int, lockout: float, lockout_max: float) -> float | None:
        with self._write() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", (account,))
            row = conn.execute("SELECT until FROM lockouts WHERE account = %s AND familiar = %s"
                               " AND until > %s", (account, familiar, now)).fetchone()
            if row is not None:
                return row["until"]
            conn.execute("DELETE FROM failures WHERE account = %s AND familiar = %s AND at < %s",
                         (account, familiar, now - window))
            conn.execute("INSERT INTO failures VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                         (account, familiar, digest, now))
            count = conn.execute("SELECT count(*) AS n FROM failures WHERE account = %s"
                                 " AND familiar = %s", (account, familiar)).fetchone()["n"]
            if count < limit:
                return None
            row = conn.execute("SELECT count, until FROM lockouts WHERE account = %s"
                               " AND familiar = %s", (account, familiar)).fetchone()
            before = row["count"] if row is not None and now - row["until"] <= window + lockout_max else 0
            until = now + lockout_length(lockout, lockout_max, before)
            conn.execute("INSERT INTO lockouts VALUES (%s, %s, %s, %s) ON CONFLICT"
                         " (account, familiar) DO UPDATE SET count = excluded.count,"
                         " until = excluded.until", (account, familiar, before + 1, until))
            conn.execute("DELETE FROM failures WHERE account = %s AND familiar = %s",
                         (account, familiar))
            self._log_change(conn, now, account, "locked", None)
        return until

    def reserve_failure(self, account: str, familiar: bool, digest: bytes, now: float, *,
                        window: float, limit: int) -> Reserved:
        """See :meth:`proxy.store.sqlite.SQLiteStore.reserve_failure`."""
        with self._write() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", (account,))
            if conn.execute("SELECT 1 FROM lockouts WHERE account = %s AND familiar = %s"
                            " AND until > %s", (account, familiar, now)).fetchone() is not None:
                return Reserved.REFUSED
            conn.execute("DELETE FROM failures WHERE account = %s AND familiar = %s AND at < %s",
                         (account, familiar, now - window))
            if conn.execute("SELECT 1 FROM failures WHERE account = %s AND familiar = %s"
                            " AND digest = %s", (account, familiar, digest)).fetchone() is not None:
                return Reserved.COUNTED
            count = conn.execute("SELECT count(*) AS n FROM failures WHERE account = %s"
                                 " AND familiar = %s", (account, familiar)).fetchone()["n"]
            if count >= limit:
                return Reserved.REFUSED
            conn.execute("INSERT INTO failures VALUES (%s, %s, %s, %s)",
                         (account, familiar, digest, now))
        return Reserved.NEW

    def release_failure(self, account: str, familiar: bool, digest: bytes) -> None:
        with self._write() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", (account,))
            conn.execute("DELETE FROM failures WHERE account = %s AND familiar = %s"
                         " AND digest = %s", (account, familiar, digest))

    def forgive_failures(self, account: str, familiar: bool, digests: list[bytes], before: float,
                         now: float) -> None:
        """See :meth:`proxy.store.Store.forgive_failures`."""
        with self._write() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", (account,))
            if conn.execute("SELECT 1 FROM lockouts WHERE account = %s AND familiar = %s"
                            " AND until > %s", (account, familiar, now)).fetchone() is not None:
                return
            conn.execute("DELETE FROM failures WHERE account = %s AND familiar = %s AND at < %s"
                         " AND digest = ANY(%s)", (account, familiar, before, digests))
            conn.execute("DELETE FROM lockouts WHERE account = %s AND familiar = %s",
                         (account, familiar))

    def lockouts(self, now: float, account: str | None = None) -> dict[str, dict[bool, float]]:
        with self._connection() as conn:
            if account is None:
                rows = conn.execute("SELECT account, familiar, until FROM lockouts"
                                    " WHERE until > %s", (now,)).fetchall()
            else:
                rows = conn.execute("SELECT account, familiar, until FROM lockouts"
                                    " WHERE until > %s AND account = %s", (now, account)).fetchall()
        found: dict[str, dict[bool, float]] = {}
        for r in rows:
            found.setdefault(r["account"], {})[bool(r["familiar"])] = r["until"]
        return found

    def unlock(self, account: str, now: float) -> None:
        with self._write() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", (account,))
            conn.execute("DELETE FROM failures WHERE account = %s", (account,))
            conn.execute("DELETE FROM lockouts WHERE account = %s", (account,))
            self._log_change(conn, now, account, "unlocked", None)


class _Tokens:
    """The management API's tokens, kept by a keyed hash of the token, never
    the token: part of :class:`PostgresStore`."""

    def create_api_token(self, *, name: str, lookup_key: bytes, scope: str, created_by: str,
                         now: float, expires_at: float | None, rate: int) -> ApiToken:
        try:
            with self._write() as conn:
                conn.execute(f"INSERT INTO api_tokens ({API_TOKEN_COLUMNS}, lookup_key)"
                             " VALUES (%s, %s, %s, %s, %s, %s, NULL, %s)",
                             (name, scope, now, created_by, expires_at, rate, lookup_key))
        except errors.UniqueViolation as e:
            if e.diag.constraint_name == "api_tokens_pkey":
                raise TokenNameTaken(name) from None
            raise StoreError("could not store the API token; try again") from None
        return ApiToken(name, scope, now, created_by, expires_at, rate)

    def list_api_tokens(self) -> list[ApiToken]:
        with self._connection() as conn:
            rows = conn.execute(f"SELECT {API_TOKEN_COLUMNS} FROM api_tokens"
                                f" ORDER BY name COLLATE \"C\"").fetchall()
        return [api_token_from(r) for r in rows]

    def find_api_token(self, lookup_key: bytes) -> ApiToken | None:
        with self._connection() as conn:
            row = conn.execute(f"SELECT {API_TOKEN_COLUMNS} FROM api_tokens"
                               f" WHERE lookup_key = %s", (lookup_key,)).fetchone()
        return None if row is None else api_token_from(row)

    def revoke_api_token(self, name: str) -> ApiToken | None:
        with self._write() as conn:
            row = conn.execute(f"DELETE FROM api_tokens WHERE name = %s"
                               f" RETURNING {API_TOKEN_COLUMNS}", (name,)).fetchone()
        return None if row is None else api_token_from(row)

    def record_api_token_use(self, name: str, at: float) -> None:
        with self._write() as conn:
            conn.execute("UPDATE api_tokens SET last_used_at = greatest(last_used_at, %s)"
                         " WHERE name = %s", (at, name))


class _Passkeys:
    """A user's passkeys (WebAuthn credentials) for the portal, each with
    its signature counter, shared by every process: part of :class:`PostgresStore`."""

    def add_passkey(self, passkey: Passkey) -> Passkey:
        try:
            with self._write() as conn:
                conn.execute(
                    f"INSERT INTO passkeys ({PASSKEY_COLUMNS})"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s)", attrs.astuple(passkey))
        except errors.UniqueViolation:
            raise PasskeyTaken(passkey.username, passkey.name) from None
        return passkey

    def list_passkeys(self, username: str) -> list[Passkey]:
        with self._connection() as conn:
            rows = conn.execute(f"SELECT {PASSKEY_COLUMNS} FROM passkeys WHERE username = %s"
                                " ORDER BY created_at", (username,)).fetchall()
        return [passkey_from(r) for r in rows]

    def delete_passkey(self, username: str, credential_id: bytes) -> Passkey | None:
        with self._write() as conn:
            row = conn.execute(f"DELETE FROM passkeys WHERE username = %s AND credential_id = %s"
                               f" RETURNING {PASSKEY_COLUMNS}",
                               (username, credential_id)).fetchone()
        return None if row is None else passkey_from(row)

    def delete_passkeys(self, username: str, now: float) -> int:
        with self._write() as conn:
            gone = conn.execute("DELETE FROM passkeys WHERE username = %s", (username,)).rowcount
            self._log_change(conn, now, username, "second_factor_reset", None)
        return gone

    def use_passkey(self, username: str, credential_id: bytes, sign_count: int, now: float) -> bool:
        with self._write() as conn:
            used = conn.execute(
                "UPDATE passkeys SET sign_count = %s, last_used_at = %s"
                " WHERE username = %s AND credential_id = %s"
                " AND (sign_count < %s OR (sign_count = 0 AND %s = 0))",
                (sign_count, now, username, credential_id, sign_count, sign_count)).rowcount
        return bool(used)


class _Outbox:
    """Events waiting for webhooks, shared by the fleet: part of
    :class:`PostgresStore`. A lane (a webhook's events of one user) is
    claimed by one node at a time (``FOR UPDATE SKIP LOCKED``, then a lease
    while its first event is posted), so each event is delivered by one
    node; a node that dies mid-delivery leaves a lease that runs out, and
    another node delivers the event again. Inserts, and what moves or ends
    a lane, take one advisory lock: a lane is never ended while an event
    for it is being added."""

    def add_events(self, rows: list[tuple[str, str, str, str]], now: float) -> None:
        if not rows:
            return
        with self._write() as conn:
            # Numbered in commit order, as the change feed is: a lane's next
            # event is never visible before the one it follows.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (OUTBOX_LOCK,))
            before = conn.execute("SELECT coalesce(max(seq), 0) AS seq FROM outbox"
                                  ).fetchone()["seq"]
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO outbox (webhook, lane, event, body, created_at)"
                    " VALUES (%s, %s, %s, %s, %s)", [(*row, now) for row in rows])
            conn.execute(
                "INSERT INTO outbox_lanes (webhook, lane, head, next_at)"
                " SELECT webhook, lane, min(seq), %s FROM outbox WHERE seq > %s"
                " GROUP BY webhook, lane ON CONFLICT (webhook, lane) DO NOTHING", (now, before))

    def claim_events(self, webhooks: tuple[str, ...], node: str, now: float, lease: float,
                     limit: int) -> list[OutboxEvent]:
        if not webhooks:
            return []
        with self._write() as conn:
            # Lanes another node is claiming this instant are skipped, not waited for.
            heads = conn.execute(
                "UPDATE outbox_lanes SET claimed_by = %s, claimed_until = %s"
                " WHERE (webhook, lane) IN (SELECT webhook, lane FROM outbox_lanes"
                "  WHERE webhook = ANY(%s) AND next_at <= %s"
                "  AND (claimed_until IS NULL OR claimed_until <= %s)"
                "  ORDER BY head LIMIT %s FOR UPDATE SKIP LOCKED)"
                " AND (claimed_until IS NULL OR claimed_until <= %s) RETURNING head",
                (node, now + lease, list(webhooks), now, now, limit, now)).fetchall()
            if not heads:
                return []
            rows = conn.execute(f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE seq = ANY(%s)",
                                ([h["head"] for h in heads],)).fetchall()
        return sorted((outbox_event_from(r) for r in rows), key=lambda e: e.seq)

    def settle_events(self, delivered: list[int], failed: list[tuple[int, float, str]],
                      now: float) -> None:
        if not delivered and not failed:
            return
        with self._write() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (OUTBOX_LOCK,))
            for seq in delivered:
                row = conn.execute(
                    "UPDATE outbox SET delivered_at = %s, attempts = attempts + 1,"
                    " last_error = NULL WHERE seq = %s AND delivered_at IS NULL"
                    " RETURNING webhook, lane", (now, seq)).fetchone()
                if row is None:
                    continue  # marked already (delivered twice after a lease ran out)
                after = conn.execute(
                    "SELECT min(seq) AS seq FROM outbox WHERE webhook = %s AND lane = %s"
                    " AND delivered_at IS NULL AND seq > %s",
                    (row["webhook"], row["lane"], seq)).fetchone()["seq"]
                if after is None:
                    conn.execute("DELETE FROM outbox_lanes WHERE webhook = %s AND lane = %s"
                                 " AND head = %s", (row["webhook"], row["lane"], seq))
                else:
                    conn.execute(
                        "UPDATE outbox_lanes SET head = %s, next_at = %s, claimed_by = NULL,"
                        " claimed_until = NULL WHERE webhook = %s AND lane = %s AND head = %s",
                        (after, now, row["webhook"], row["lane"], seq))
            for seq, retry_at, why in failed:
                row = conn.execute(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = %s"
                    " WHERE seq = %s AND delivered_at IS NULL RETURNING webhook, lane",
                    (why, seq)).fetchone()
                if row is not None:
                    conn.execute(
                        "UPDATE outbox_lanes SET next_at = %s, claimed_by = NULL,"
                        " claimed_until = NULL WHERE webhook = %s AND lane = %s AND head = %s",
                        (retry_at, row["webhook"], row["lane"], seq))

    def forget_claims(self) -> None:
        pass  # other nodes' claims are theirs until their lease ends

    def outbox_stats(self) -> dict[str, OutboxStats]:
        with self._connection() as conn:
            counts = conn.execute(
                "SELECT webhook, count(*) AS n FROM outbox WHERE delivered_at IS NULL"
                " GROUP BY webhook").fetchall()
            oldest = {r["webhook"]: r["oldest"] for r in conn.execute(
                "SELECT l.webhook, min(o.created_at) AS oldest FROM outbox_lanes l"
                " JOIN outbox o ON o.seq = l.head GROUP BY l.webhook").fetchall()}
        return {r["webhook"]: OutboxStats(r["n"], oldest.get(r["webhook"])) for r in counts}

    def prune_events(self, delivered_before: float, give_up: dict[str, float],
                     default_give_up: float) -> tuple[int, int]:
        with self._write() as conn:
            delivered = conn.execute(
                "DELETE FROM outbox WHERE delivered_at IS NOT NULL AND delivered_at < %s",
                (delivered_before,)).rowcount
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (OUTBOX_LOCK,))
            dropped = 0
            for webhook, before in give_up.items():
                dropped += conn.execute(
                    "DELETE FROM outbox WHERE delivered_at IS NULL AND webhook = %s"
                    " AND created_at < %s", (webhook, before)).rowcount
            dropped += conn.execute(
                "DELETE FROM outbox WHERE delivered_at IS NULL AND created_at < %s"
                " AND NOT (webhook = ANY(%s))", (default_give_up, list(give_up))).rowcount
            if dropped:  # lanes whose head went: gone, or on to their next event
                conn.execute(
                    "DELETE FROM outbox_lanes l WHERE NOT EXISTS (SELECT 1 FROM outbox o"
                    " WHERE o.webhook = l.webhook AND o.lane = l.lane"
                    " AND o.delivered_at IS NULL)")
                conn.execute(
                    "UPDATE outbox_lanes l SET head = (SELECT min(o.seq) FROM outbox o"
                    " WHERE o.webhook = l.webhook AND o.lane = l.lane"
                    " AND o.delivered_at IS NULL), next_at = 0, claimed_by = NULL,"
                    " claimed_until = NULL"
                    " WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.seq = l.head"
                    " AND o.delivered_at IS NULL)")
        return delivered, dropped


class PostgresStore(_Counts, _Tokens, _Passkeys, _Outbox):
    """A :class:`proxy.store.Store` on PostgreSQL; safe to call from several threads."""

    def __init__(self, url: str, *, password: str | None = None, pool_size: int = 4,
                 timeout: float = 5.0, migrate: bool = False) -> None:
        self.url = url
        milliseconds = int(timeout * 1000)
        # Every wait is bounded: connecting, each statement, each lock, a
        # server or network that stops answering mid-query (TCP keepalives
        # and TCP_USER_TIMEOUT), so a store that hangs is an error in
        # ``timeout``, not a stuck thread.
        self._kwargs: dict[str, Any] = {
            "connect_timeout": max(1, int(timeout)),
            "application_name": "legacy-auth-proxy",
            "keepalives": 1, "keepalives_idle": max(1, int(timeout)),
            "keepalives_interval": 1, "keepalives_count": 3,
            "tcp_user_timeout": milliseconds,
            "options": f"-c statement_timeout={milliseconds} -c lock_timeout={milliseconds}"
                       f" -c idle_in_transaction_session_timeout={milliseconds * 2}",
        }
        self._down_until = 0.0  # while the store is known down, calls fail at once
        if password:
            self._kwargs["password"] = password
        self.where = self._describe(url)
        self._timeout = timeout
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=timeout,
                                    kwargs=self._kwargs, open=False, name="legacy-auth-proxy",
                                    reconnect_timeout=0, check=self._check)
        try:
            self._first_connection(migrate)
            try:
                self._pool.open(wait=True, timeout=timeout)
            except Exception as e:  # gone since the first connection
                raise StoreUnavailable(f"{self.where}: the store cannot be reached: "
                                       f"{_what(e)}") from None
        except BaseException:
            self._pool.close()
            raise

    def _first_connection(self, migrate: bool) -> None:
        """Connect once, directly, and check the schema. The pool would try
        again and again until ``timeout``, logging each try, to say at the
        end only that no connection came: this fails at once when the
        connection is refused, and says whether waiting can mend it."""
        try:
            conn = psycopg.connect(self.url, row_factory=dict_row, **self._kwargs)
        except psycopg.Error as e:
            if unavailable(e):
                raise StoreUnavailable(f"{self.where}: the store cannot be reached: "
                                       f"{_what(e)}") from None
            raise StoreError(f"{self.where}: cannot connect: {_what(e)}") from None
        watched = _watchdog.watch(conn, self._timeout + 1.0)
        try:
            with conn.transaction():
                self._check_schema(conn, migrate)
        except StoreError:
            raise
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:  # lost, timed out
            raise StoreUnavailable(f"{self.where}: the store cannot be reached: "
                                   f"{_what(e)}") from None
        except psycopg.Error as e:  # no right to create the tables, ...
            raise StoreError(f"{self.where}: the store refused: {_what(e)}") from None
        finally:
            _watchdog.done(watched)
            conn.close()  # not its context: a rollback on a broken one logs a warning

    @staticmethod
    def _describe(url: str) -> str:
        """The URL without any password, for messages."""
        try:
            info = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            return "the PostgreSQL store"
        host = info.get("host") or "localhost"
        return f"postgresql://{info.get('user', '')}{'@' if info.get('user') else ''}{host}" \
               f":{info.get('port', 5432)}/{info.get('dbname', '')}"

    # -- plumbing ------------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        # While the database is known to be down, fail at once: one call a
        # second finds out whether it is back (the others would each wait
        # the whole timeout, and the pool's threads with them).
        now = time.monotonic()
        if now < self._down_until:
            raise StoreUnavailable(f"{self.where}: the store cannot be reached; nothing was changed")
        try:
            with self._pool.connection() as conn:
                conn.row_factory = dict_row  # type: ignore[assignment]
                watched = _watchdog.watch(conn, self._timeout + 1.0)
                try:
                    yield conn
                finally:
                    _watchdog.done(watched)
        except StoreError:
            raise
        except (psycopg.OperationalError, PoolTimeout, psycopg.InterfaceError) as e:
            self._down_until = time.monotonic() + 1.0
            raise StoreUnavailable(f"{self.where}: the store cannot be reached: {_what(e)}; "
                             f"nothing was changed") from None
        except errors.IntegrityError:
            raise  # a row the schema refuses: the caller's to handle
        except psycopg.Error as e:  # read-only after a failover, serialization, ...
            raise StoreError(f"{self.where}: the store refused: {_what(e)}; "
                             f"nothing was changed") from None
        self._down_until = 0.0

    def _check(self, conn: Any) -> None:
        """The pool's test of a connection before handing it out (a server
        restarted since leaves stale ones), itself bounded by the watchdog."""
        watched = _watchdog.watch(conn, self._timeout)
        try:
            conn.execute("")
        finally:
            _watchdog.done(watched)

    @contextlib.contextmanager
    def _write(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction: all of it lands, or none of it."""
        with self._connection() as conn, conn.transaction():
            yield conn

    def _check_schema(self, conn: psycopg.Connection[Any], migrate: bool) -> None:
        """In the caller's transaction."""
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (FEED_LOCK + 1,))
        exists = conn.execute(
            "SELECT to_regclass('schema_version') IS NOT NULL AS present").fetchone()["present"]
        version = 0
        if exists:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = row["version"] if row else 0
        if version > len(MIGRATIONS):
            raise SchemaTooNew(
                f"{self.where}: schema version {version} is newer than this version of "
                f"legacy-auth-proxy knows ({len(MIGRATIONS)})")
        if 0 < version < len(MIGRATIONS) and not migrate:
            raise SchemaOutdated(
                f"{self.where}: the store's schema is version {version}; this version of "
                f"legacy-auth-proxy needs {len(MIGRATIONS)}: back it up, then run "
                f"'legacy-auth-proxy migrate'")
        if not exists:
            conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (0)")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.execute(script)  # type: ignore[arg-type]
            conn.execute("UPDATE schema_version SET version = %s", (number,))

    @property
    def schema_version(self) -> int:
        with self._connection() as conn:
            return conn.execute("SELECT version FROM schema_version").fetchone()["version"]

    def _log_change(self, conn: Any, now: float, username: str, kind: str, id: str | None) -> None:
        # In commit order: the lock is held until this transaction ends.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (FEED_LOCK,))
        seq = conn.execute(
            "INSERT INTO changes (at, username, kind, app_password_id) VALUES (%s, %s, %s, %s)"
            " RETURNING seq", (now, username, ChangeKind(kind).value, id)).fetchone()["seq"]
        conn.execute("DELETE FROM changes WHERE at < %s", (now - CHANGE_RETENTION,))
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))

    # -- app passwords -----------------------------------------------------------------

    def create_app_password(self, *, username: str, name: str, lookup_key: bytes,
                            password_hash: str, created_by: str, now: float,
                            expires_at: float | None, protocols: frozenset[str] | None,
                            limit: int, networks: tuple[str, ...] | None = None) -> AppPassword:
        record = AppPassword(id=secrets.token_hex(5), username=username, name=name,
                             created_at=now, created_by=created_by, expires_at=expires_at,
                             protocols=protocols, networks=networks)
        try:
            with self._write() as conn:
                # One creation per user at a time, across the fleet: the count holds.
                conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (username,))
                count = conn.execute(
                    "SELECT count(*) AS n FROM app_passwords WHERE username = %s"
                    " AND stopped_at IS NULL AND (expires_at IS NULL OR expires_at > %s)",
                    (username, now)).fetchone()["n"]
                if count >= limit:
                    raise LimitReached(username, count, limit)
                conn.execute(
                    "INSERT INTO app_passwords (id, username, name, lookup_key, password_hash,"
                    " created_at, created_by, expires_at, protocols, networks)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (record.id, username, name, lookup_key, password_hash, now, created_by,
                     expires_at, ",".join(sorted(protocols)) if protocols is not None else None,
                     ",".join(networks) if networks is not None else None))
        except errors.UniqueViolation as e:
            if e.diag.constraint_name == "app_passwords_username_name_key":
                raise NameTaken(username, name) from None
            raise StoreError("could not store the app password; try again") from None
        return record

    def list_app_passwords(self, username: str) -> list[AppPassword]:
        with self._connection() as conn:
            rows = conn.execute(f"SELECT {COLUMNS} FROM app_passwords WHERE username = %s"
                                f" ORDER BY created_at, id", (username,)).fetchall()
        return [app_password_from(r) for r in rows]

    def page_app_passwords(self, after: str | None, limit: int) -> list[AppPassword]:
        with self._connection() as conn:
            # Ids are lowercase hex: in the same order under any collation
            # as in SQLite's, so the primary key's index serves the page.
            rows = conn.execute(f"SELECT {COLUMNS} FROM app_passwords"
                                f" WHERE id > %s ORDER BY id LIMIT %s",
                                (after or "", limit)).fetchall()
        return [app_password_from(r) for r in rows]

    def has_app_passwords(self) -> bool:
        with self._connection() as conn:
            return conn.execute("SELECT 1 FROM app_passwords LIMIT 1").fetchone() is not None

    def find_app_password(self, username: str, id_or_name: str) -> AppPassword | None:
        with self._connection() as conn:
            for column in ("id", "name"):
                row = conn.execute(f"SELECT {COLUMNS} FROM app_passwords WHERE username = %s"
                                   f" AND {column} = %s", (username, id_or_name)).fetchone()
                if row is not None:
                    return app_password_from(row)
        return None

    def find_by_lookup_key(self, lookup_key: bytes) -> tuple[AppPassword, str] | None:
        with self._connection() as conn:
            row = conn.execute(f"SELECT {COLUMNS}, password_hash FROM app_passwords"
                               f" WHERE lookup_key = %s", (lookup_key,)).fetchone()
        return None if row is None else (app_password_from(row), row["password_hash"])

    def delete_app_password(self, username: str, id: str, now: float) -> AppPassword | None:
        with self._write() as conn:
            row = conn.execute(f"DELETE FROM app_passwords WHERE username = %s AND id = %s"
                               f" RETURNING {COLUMNS}", (username, id)).fetchone()
            if row is None:
                return None
            self._log_change(conn, now, username, "deleted", id)
        return app_password_from(row)

    def revoke_all(self, username: str, now: float) -> list[AppPassword]:
        with self._write() as conn:
            rows = conn.execute(f"DELETE FROM app_passwords WHERE username = %s"
                                f" RETURNING {COLUMNS}", (username,)).fetchall()
            self._log_change(conn, now, username, "revoked_all", None)
        return sorted((app_password_from(r) for r in rows), key=lambda a: (a.created_at, a.id))

    def stop_created_before(self, username: str, when: float, now: float) -> list[AppPassword]:
        with self._write() as conn:
            rows = conn.execute(
                f"UPDATE app_passwords SET stopped_at = %s, stopped_reason = 'password_change'"
                f" WHERE username = %s AND created_at < %s AND stopped_at IS NULL"
                f" AND (expires_at IS NULL OR expires_at > %s) RETURNING {COLUMNS}",
                (now, username, when, now)).fetchall()
            for row in rows:
                self._log_change(conn, now, username, "stopped", row["id"])
        return sorted((app_password_from(r) for r in rows), key=lambda a: (a.created_at, a.id))

    def sweep(self, now: float, idle_expiry: float | None) -> list[AppPassword]:
        with self._write() as conn:
            # Forgotten first, before the feed's lock is taken: a deletion
            # holding one of these rows waits for that lock.
            conn.execute("DELETE FROM app_passwords WHERE stopped_at < %s", (now - STOPPED_KEPT,))
            conn.execute("DELETE FROM failures WHERE at < %s", (now - FAILURES_KEPT,))
            conn.execute("DELETE FROM lockouts WHERE until < %s", (now - FAILURES_KEPT,))
            rows = conn.execute(
                f"UPDATE app_passwords SET stopped_at = expires_at, stopped_reason = 'expired'"
                f" WHERE stopped_at IS NULL AND expires_at <= %s RETURNING {COLUMNS}",
                (now,)).fetchall()
            if idle_expiry:
                rows += conn.execute(
                    f"UPDATE app_passwords SET stopped_at = coalesce(last_used_at, created_at) + %s,"
                    f" stopped_reason = 'unused' WHERE stopped_at IS NULL"
                    f" AND coalesce(last_used_at, created_at) <= %s RETURNING {COLUMNS}",
                    (idle_expiry, now - idle_expiry)).fetchall()
            for row in rows:
                self._log_change(conn, now, row["username"], "stopped", row["id"])
        return sorted((app_password_from(r) for r in rows), key=lambda a: (a.created_at, a.id))

    def record_use(self, id: str, at: float, address: str | None, protocol: str,
                   count: int = 1) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE app_passwords SET last_used_at = greatest(last_used_at, %s),"
                " last_used_address = %s, last_used_protocol = %s, use_count = use_count + %s"
                " WHERE id = %s", (at, address, protocol, count, id))

    def replace_hash(self, id: str, password_hash: str) -> None:
        with self._write() as conn:
            conn.execute("UPDATE app_passwords SET password_hash = %s WHERE id = %s",
                         (password_hash, id))

    # -- users ---------------------------------------------------------------------------

    def get_user(self, username: str) -> User:
        with self._connection() as conn:
            row = conn.execute("SELECT mfa_state, mfa_registered_at FROM users"
                               " WHERE username = %s", (username,)).fetchone()
        if row is None:
            return User(username)
        return User(username, MfaState(row["mfa_state"]), row["mfa_registered_at"])

    def set_user(self, user: User, now: float, expected: User | None = None) -> User:
        with self._write() as conn:
            if expected is not None:
                row = conn.execute("SELECT mfa_state, mfa_registered_at FROM users"
                                   " WHERE username = %s FOR UPDATE", (user.username,)).fetchone()
                found = User(user.username) if row is None else \
                    User(user.username, MfaState(row["mfa_state"]), row["mfa_registered_at"])
                if found != expected:
                    raise Conflict(f"the state of {user.username} changed since it was read")
            conn.execute(
                "INSERT INTO users (username, mfa_state, mfa_registered_at, updated_at)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (username) DO UPDATE SET"
                " mfa_state = excluded.mfa_state, mfa_registered_at = excluded.mfa_registered_at,"
                " updated_at = excluded.updated_at",
                (user.username, user.mfa_state.value, user.mfa_registered_at, now))
            self._log_change(conn, now, user.username, "state_changed", None)
        return user

    # -- second factor -----------------------------------------------------------------

    def get_totp(self, username: str) -> tuple[bytes, int] | None:
        with self._connection() as conn:
            row = conn.execute("SELECT totp, last_step FROM second_factors WHERE username = %s",
                               (username,)).fetchone()
        return None if row is None else (bytes(row["totp"]), row["last_step"])

    def add_totp(self, username: str, sealed: bytes, step: int, now: float) -> bool:
        with self._write() as conn:
            added = conn.execute(
                "INSERT INTO second_factors (username, totp, created_at, last_step)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (username) DO NOTHING",
                (username, sealed, now, step)).rowcount
        return bool(added)

    def delete_totp(self, username: str, now: float) -> bool:
        with self._write() as conn:
            gone = conn.execute("DELETE FROM second_factors WHERE username = %s",
                                (username,)).rowcount
            self._log_change(conn, now, username, "second_factor_reset", None)
        return bool(gone)

    def use_totp_step(self, username: str, step: int) -> bool:
        with self._write() as conn:
            taken = conn.execute("UPDATE second_factors SET last_step = %s"
                                 " WHERE username = %s AND last_step < %s",
                                 (step, username, step)).rowcount
        return bool(taken)

    # -- failed sign-ins, shared ---------------------------------------------------------

    def note(self, username: str, kind: str, now: float) -> None:
        with self._write() as conn:
            self._log_change(conn, now, username, kind, None)

    # -- change feed ---------------------------------------------------------------------

    def changes_since(self, seq: int) -> list[Change]:
        with self._connection() as conn:
            rows = conn.execute("SELECT seq, at, username, kind, app_password_id FROM changes"
                                " WHERE seq > %s ORDER BY seq", (seq,)).fetchall()
        return [Change(r["seq"], r["at"], r["username"], ChangeKind(r["kind"]), r["app_password_id"])
                for r in rows]

    def last_change(self) -> int:
        with self._connection() as conn:
            return conn.execute("SELECT coalesce(max(seq), 0) AS seq FROM changes").fetchone()["seq"]

    def listen(self, notified: Callable[[], None], listening: Callable[[bool], None],
               stop: threading.Event) -> None:
        """Block until ``stop`` is set: call ``notified()`` whenever another
        process (or this one) writes to the change feed. ``listening(True)``
        once the subscription is in place (read the feed then: what was
        written before is not announced), ``listening(False)`` when the
        connection is lost; it is made again, with backoff. Runs on a thread
        of its own, outside the store's pool."""
        delay = 0.5
        while not stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, **self._kwargs) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    listening(True)
                    delay = 0.5
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            notified()
                        # Notice a dead (or frozen) server within a turn.
                        watched = _watchdog.watch(conn, self._timeout)
                        try:
                            conn.execute("SELECT 1")
                        finally:
                            _watchdog.done(watched)
            except Exception:
                listening(False)
                stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def close(self) -> None:
        self._pool.close()
