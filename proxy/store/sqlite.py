"""The SQLite store: one file, WAL, ``synchronous=FULL``, a versioned schema.

Every write is one ``BEGIN IMMEDIATE`` transaction, so a process killed at
any point leaves either the whole change or none of it. The daemon and the
command line tool may use the same file at once; WAL lets readers go on while
one of them writes, and ``busy_timeout`` makes a writer wait its turn.

The schema version is SQLite's ``user_version``; :data:`MIGRATIONS` holds one
script per version, applied in order inside a transaction.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

from proxy.apppasswords import adopt_parent_owner
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
    OutboxEvent,
    OutboxStats,
    SchemaOutdated,
    SchemaTooNew,
    PASSKEY_COLUMNS,
    Passkey,
    PasskeyTaken,
    StoreError,
    TokenNameTaken,
    User,
    api_token_from,
    app_password_from,
    outbox_event_from,
    passkey_from,
)

MIGRATIONS: tuple[str, ...] = (
    # 1: app passwords, users' cloud state and the change feed.
    """
    CREATE TABLE users (
        username          TEXT PRIMARY KEY,
        mfa_state         TEXT NOT NULL DEFAULT 'disabled'
                          CHECK (mfa_state IN ('disabled', 'enabled', 'enforced')),
        mfa_registered_at REAL,
        updated_at        REAL NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE app_passwords (
        id                 TEXT PRIMARY KEY,
        username           TEXT NOT NULL,
        name               TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
        lookup_key         BLOB NOT NULL UNIQUE CHECK (length(lookup_key) = 32),
        password_hash      TEXT NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
        created_at         REAL NOT NULL,
        created_by         TEXT NOT NULL,
        expires_at         REAL,
        protocols          TEXT,
        last_used_at       REAL,
        last_used_address  TEXT,
        last_used_protocol TEXT,
        use_count          INTEGER NOT NULL DEFAULT 0,
        UNIQUE (username, name)
    );

    CREATE TABLE changes (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,
        at              REAL NOT NULL,
        username        TEXT NOT NULL,
        kind            TEXT NOT NULL,
        app_password_id TEXT
    );
    CREATE INDEX changes_at ON changes (at);
    """,
    # 2: source networks; app passwords that stopped by themselves, kept
    # listed for a while; users' second factor (TOTP) for the portal.
    """
    ALTER TABLE app_passwords ADD COLUMN networks TEXT;
    ALTER TABLE app_passwords ADD COLUMN stopped_at REAL;
    ALTER TABLE app_passwords ADD COLUMN stopped_reason TEXT
        CHECK (stopped_reason IN ('expired', 'password_change', 'unused'));

    CREATE TABLE second_factors (
        username   TEXT PRIMARY KEY,
        totp       BLOB NOT NULL,
        created_at REAL NOT NULL,
        last_step  INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    """,
    # 3: failed sign-ins and lockouts, shared by every process using the store.
    """
    CREATE TABLE failures (
        account  TEXT NOT NULL,
        familiar INTEGER NOT NULL,
        digest   BLOB NOT NULL,
        at       REAL NOT NULL,
        PRIMARY KEY (account, familiar, digest)
    ) WITHOUT ROWID;

    CREATE TABLE lockouts (
        account  TEXT NOT NULL,
        familiar INTEGER NOT NULL,
        count    INTEGER NOT NULL,
        until    REAL NOT NULL,
        PRIMARY KEY (account, familiar)
    ) WITHOUT ROWID;
    """,
    # 4: the REST API's tokens, kept as keyed hashes (lookup keys) only.
    """
    CREATE TABLE api_tokens (
        name         TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64),
        lookup_key   BLOB NOT NULL UNIQUE CHECK (length(lookup_key) = 32),
        scope        TEXT NOT NULL CHECK (scope IN ('read', 'manage', 'helpdesk')),
        created_at   REAL NOT NULL,
        created_by   TEXT NOT NULL,
        expires_at   REAL,
        rate         INTEGER NOT NULL CHECK (rate > 0),
        last_used_at REAL
    ) WITHOUT ROWID;
    """,
    # 5: the outbox of events for webhooks: one row per event and webhook,
    # kept a while after delivery; and one row per lane (a webhook's events
    # of one user) with waiting events: its first undelivered event, when it
    # is due, who holds it. A claim reads lanes, never the whole backlog.
    """
    CREATE TABLE outbox (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        webhook       TEXT NOT NULL,
        lane          TEXT NOT NULL,
        event         TEXT NOT NULL,
        body          TEXT NOT NULL,
        created_at    REAL NOT NULL,
        attempts      INTEGER NOT NULL DEFAULT 0,
        last_error    TEXT,
        delivered_at  REAL
    );
    CREATE INDEX outbox_waiting ON outbox (webhook, lane, seq) WHERE delivered_at IS NULL;
    CREATE INDEX outbox_delivered ON outbox (delivered_at) WHERE delivered_at IS NOT NULL;

    CREATE TABLE outbox_lanes (
        webhook       TEXT NOT NULL,
        lane          TEXT NOT NULL,
        head          INTEGER NOT NULL,
        next_at       REAL NOT NULL,
        claimed_by    TEXT,
        claimed_until REAL,
        PRIMARY KEY (webhook, lane)
    ) WITHOUT ROWID;
    CREATE INDEX outbox_lanes_due ON outbox_lanes (webhook, next_at);
    """,
    # 6: users' passkeys (WebAuthn credentials) for the portal: the public
    # key with its signature counter (a clone's goes back), a name, when
    # made and last used.
    """
    CREATE TABLE passkeys (
        credential_id BLOB PRIMARY KEY CHECK (length(credential_id) BETWEEN 1 AND 1023),
        username      TEXT NOT NULL,
        name          TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
        credential    BLOB NOT NULL,
        sign_count    INTEGER NOT NULL DEFAULT 0,
        created_at    REAL NOT NULL,
        last_used_at  REAL,
        UNIQUE (username, name)
    );
    """,
)

# Failures and lockouts older than this are forgotten by the sweep (they count
# for throttle.failure_window and lockout_max only; this bounds both).
FAILURES_KEPT = 86400.0

# How long the change feed keeps an entry: daemons poll it every second or
# so; a day covers any daemon that is not hopelessly stuck.
CHANGE_RETENTION = 86400.0

# How long a statement waits for another process's write (busy_timeout), and
# an opening for another process opening the store at the same time.
OPEN_TIMEOUT = 10.0


class _Counts:
    """Failures counted by every process sharing the store, and the lockouts
    they decide: part of :class:`SQLiteStore`."""

    def add_failure(self, account: str, familiar: bool, digest: bytes, now: float, *,
                    window: float, limit: int, lockout: float, lockout_max: float) -> float | None:
        """Count a wrong secret for the user ``account`` from a familiar place
        or not, as every process sharing the store counts it: until when the
        account is locked (by this failure, or still), else None."""
        with self._write():
            row = self._db.execute(
                "SELECT until FROM lockouts WHERE account = ? AND familiar = ? AND until > ?",
                (account, familiar, now)).fetchone()
            if row is not None:
                return row[0]
            self._db.execute("DELETE FROM failures WHERE account = ? AND familiar = ? AND at < ?",
                             (account, familiar, now - window))
            self._db.execute("INSERT OR IGNORE INTO failures VALUES (?, ?, ?, ?)",
                             (account, familiar, digest, now))
            count = self._db.execute(
                "SELECT count(*) FROM failures WHERE account = ? AND familiar = ?",
                (account, familiar)).fetchone()[0]
            if count < limit:
                return None
            row = self._db.execute(
                "SELECT count, until FROM lockouts WHERE account = ? AND familiar = ?",
                (account, familiar)).fetchone()
            before = row[0] if row is not None and now - row[1] <= window + lockout_max else 0
            until = now + lockout_length(lockout, lockout_max, before)
            self._db.execute(
                "INSERT INTO lockouts VALUES (?, ?, ?, ?) ON CONFLICT (account, familiar)"
                " DO UPDATE SET count = excluded.count, until = excluded.until",
                (account, familiar, before + 1, until))
            self._db.execute("DELETE FROM failures WHERE account = ? AND familiar = ?",
                             (account, familiar))
            self._log_change(now, account, "locked", None)
        return until

    def reserve_failure(self, account: str, familiar: bool, digest: bytes, now: float, *,
                        window: float, limit: int) -> Reserved:
        """Count a secret about to be checked as a failure before the check
        is made, as every process sharing the store counts it: REFUSED if
        the account is locked, or if, with the failures and the checks under
        way in every process, it could take the account past ``limit`` (the
        check must not be made). NEW: a row counts it now, which stays as the
        failure if the secret was wrong (:meth:`add_failure` finds it), and
        goes with :meth:`release_failure` otherwise; one left by a process
        that died mid-check counts as a failure until ``window`` forgets it.
        COUNTED: the same guess is counted already (a failure, or another
        check of it): that row is not this check's to release."""
        with self._write():
            if self._db.execute(
                    "SELECT 1 FROM lockouts WHERE account = ? AND familiar = ? AND until > ?",
                    (account, familiar, now)).fetchone() is not None:
                return Reserved.REFUSED
            self._db.execute("DELETE FROM failures WHERE account = ? AND familiar = ? AND at < ?",
                             (account, familiar, now - window))
            if self._db.execute(
                    "SELECT 1 FROM failures WHERE account = ? AND familiar = ? AND digest = ?",
                    (account, familiar, digest)).fetchone() is not None:
                return Reserved.COUNTED  # not a new guess
            count = self._db.execute(
                "SELECT count(*) FROM failures WHERE account = ? AND familiar = ?",
                (account, familiar)).fetchone()[0]
            if count >= limit:
                return Reserved.REFUSED
            self._db.execute("INSERT INTO failures VALUES (?, ?, ?, ?)",
                             (account, familiar, digest, now))
        return Reserved.NEW

    def release_failure(self, account: str, familiar: bool, digest: bytes) -> None:
        """The secret a NEW reservation counted was not wrong (or not
        checked): not a failure."""
        with self._write():
            self._db.execute(
                "DELETE FROM failures WHERE account = ? AND familiar = ? AND digest = ?",
                (account, familiar, digest))

    def forgive_failures(self, account: str, familiar: bool, digests: list[bytes], before: float,
                         now: float) -> None:
        """See :meth:`proxy.store.Store.forgive_failures`."""
        with self._write():
            if self._db.execute(
                    "SELECT 1 FROM lockouts WHERE account = ? AND familiar = ? AND until > ?",
                    (account, familiar, now)).fetchone() is not None:
                return
            self._db.executemany(
                "DELETE FROM failures WHERE account = ? AND familiar = ? AND at < ? AND digest = ?",
                [(account, familiar, before, digest) for digest in digests])
            self._db.execute("DELETE FROM lockouts WHERE account = ? AND familiar = ?",
                             (account, familiar))

    def lockouts(self, now: float, account: str | None = None) -> dict[str, dict[bool, float]]:
        """Lockouts in force (of ``account``, or everyone's): user → {familiar
        place?: until when}."""
        rows = self._db.execute(
            "SELECT account, familiar, until FROM lockouts WHERE until > ?"
            + (" AND account = ?" if account is not None else ""),
            (now, account) if account is not None else (now,))
        found: dict[str, dict[bool, float]] = {}
        for r in rows:
            found.setdefault(r[0], {})[bool(r[1])] = r[2]
        return found

    def unlock(self, account: str, now: float) -> None:
        """Forget the user's failures and lift their lockouts, and tell every
        daemon (``unlocked`` in the change feed), in one transaction."""
        with self._write():
            self._db.execute("DELETE FROM failures WHERE account = ?", (account,))
            self._db.execute("DELETE FROM lockouts WHERE account = ?", (account,))
            self._log_change(now, account, "unlocked", None)


class _Tokens:
    """The management API's tokens, kept by a keyed hash of the token, never
    the token: part of :class:`SQLiteStore`."""

    def create_api_token(self, *, name: str, lookup_key: bytes, scope: str, created_by: str,
                         now: float, expires_at: float | None, rate: int) -> ApiToken:
        with self._write():
            try:
                self._db.execute(
                    f"INSERT INTO api_tokens ({API_TOKEN_COLUMNS}, lookup_key)"
                    " VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                    (name, scope, now, created_by, expires_at, rate, lookup_key))
            except sqlite3.IntegrityError as e:
                if "api_tokens.name" in str(e):
                    raise TokenNameTaken(name) from None
                if str(e).startswith("UNIQUE"):
                    raise StoreError("could not store the API token; try again") from None
                raise
        return ApiToken(name, scope, now, created_by, expires_at, rate)

    def list_api_tokens(self) -> list[ApiToken]:
        rows = self._db.execute(f"SELECT {API_TOKEN_COLUMNS} FROM api_tokens ORDER BY name")
        return [api_token_from(row) for row in rows]

    def find_api_token(self, lookup_key: bytes) -> ApiToken | None:
        row = self._db.execute(
            f"SELECT {API_TOKEN_COLUMNS} FROM api_tokens WHERE lookup_key = ?", (lookup_key,)
        ).fetchone()
        return None if row is None else api_token_from(row)

    def revoke_api_token(self, name: str) -> ApiToken | None:
        with self._write():
            row = self._db.execute(
                f"DELETE FROM api_tokens WHERE name = ? RETURNING {API_TOKEN_COLUMNS}", (name,)
            ).fetchone()
        return None if row is None else api_token_from(row)

    def record_api_token_use(self, name: str, at: float) -> None:
        with self._write():
            self._db.execute(
                "UPDATE api_tokens SET last_used_at = max(coalesce(last_used_at, 0), ?)"
                " WHERE name = ?", (at, name))


class _Passkeys:
    """A user's passkeys (WebAuthn credentials) for the portal, each with
    its signature counter: part of :class:`SQLiteStore`."""

    def add_passkey(self, passkey: Passkey) -> Passkey:
        with self._write():
            try:
                self._db.execute(
                    f"INSERT INTO passkeys ({PASSKEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    attrs.astuple(passkey))
            except sqlite3.IntegrityError as e:
                if "UNIQUE" in str(e):
                    raise PasskeyTaken(passkey.username, passkey.name) from None
                raise
        return passkey

    def list_passkeys(self, username: str) -> list[Passkey]:
        rows = self._db.execute(
            f"SELECT {PASSKEY_COLUMNS} FROM passkeys WHERE username = ? ORDER BY created_at",
            (username,))
        return [passkey_from(r) for r in rows]

    def delete_passkey(self, username: str, credential_id: bytes) -> Passkey | None:
        with self._write():
            row = self._db.execute(
                f"DELETE FROM passkeys WHERE username = ? AND credential_id = ?"
                f" RETURNING {PASSKEY_COLUMNS}", (username, credential_id)).fetchone()
        return None if row is None else passkey_from(row)

    def delete_passkeys(self, username: str, now: float) -> int:
        with self._write():
            gone = self._db.execute("DELETE FROM passkeys WHERE username = ?",
                                    (username,)).rowcount
            self._log_change(now, username, "second_factor_reset", None)
        return gone

    def use_passkey(self, username: str, credential_id: bytes, sign_count: int, now: float) -> bool:
        """A sign-in with the passkey: its counter and when, in one statement,
        so two processes cannot both take the same counter value."""
        with self._write():
            used = self._db.execute(
                "UPDATE passkeys SET sign_count = ?, last_used_at = ?"
                " WHERE username = ? AND credential_id = ?"
                " AND (sign_count < ? OR (sign_count = 0 AND ? = 0))",
                (sign_count, now, username, credential_id, sign_count, sign_count)).rowcount
        return bool(used)


class _Outbox:
    """Events waiting for webhooks, and where each stands: part of
    :class:`SQLiteStore`. One daemon delivers from a SQLite store. Each
    lane (a webhook's events of one user) has a row naming its first
    undelivered event: claims read those, so a claim costs the same with a
    backlog of a million events as with none."""

    def add_events(self, rows: list[tuple[str, str, str, str]], now: float) -> None:
        if not rows:
            return
        with self._write():
            before = self._db.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]
            self._db.executemany(
                "INSERT INTO outbox (webhook, lane, event, body, created_at)"
                " VALUES (?, ?, ?, ?, ?)", [(*row, now) for row in rows])
            # A lane with no waiting event starts at its first new one.
            self._db.execute(
                "INSERT INTO outbox_lanes (webhook, lane, head, next_at)"
                " SELECT webhook, lane, min(seq), ? FROM outbox WHERE seq > ?"
                " GROUP BY webhook, lane ON CONFLICT (webhook, lane) DO NOTHING", (now, before))

    def claim_events(self, webhooks: tuple[str, ...], node: str, now: float, lease: float,
                     limit: int) -> list[OutboxEvent]:
        if not webhooks:
            return []
        marks = ", ".join("?" * len(webhooks))
        with self._write():
            heads = self._db.execute(
                f"UPDATE outbox_lanes SET claimed_by = ?, claimed_until = ?"
                f" WHERE (webhook, lane) IN (SELECT webhook, lane FROM outbox_lanes"
                f"  WHERE webhook IN ({marks}) AND next_at <= ?"
                f"  AND (claimed_until IS NULL OR claimed_until <= ?) ORDER BY head LIMIT ?)"
                f" RETURNING head", (node, now + lease, *webhooks, now, now, limit)).fetchall()
            if not heads:
                return []
            rows = self._db.execute(
                f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE seq IN"
                f" ({', '.join('?' * len(heads))})", [h[0] for h in heads]).fetchall()
        return sorted((outbox_event_from(r) for r in rows), key=lambda e: e.seq)

    def settle_events(self, delivered: list[int], failed: list[tuple[int, float, str]],
                      now: float) -> None:
        if not delivered and not failed:
            return
        with self._write():
            for seq in delivered:
                row = self._db.execute(
                    "UPDATE outbox SET delivered_at = ?, attempts = attempts + 1,"
                    " last_error = NULL WHERE seq = ? AND delivered_at IS NULL"
                    " RETURNING webhook, lane", (now, seq)).fetchone()
                if row is None:
                    continue  # marked already (delivered twice after a lease ran out)
                after = self._db.execute(
                    "SELECT min(seq) FROM outbox WHERE webhook = ? AND lane = ?"
                    " AND delivered_at IS NULL AND seq > ?", (row[0], row[1], seq)).fetchone()[0]
                if after is None:
                    self._db.execute("DELETE FROM outbox_lanes WHERE webhook = ? AND lane = ?"
                                     " AND head = ?", (row[0], row[1], seq))
                else:
                    self._db.execute(
                        "UPDATE outbox_lanes SET head = ?, next_at = ?, claimed_by = NULL,"
                        " claimed_until = NULL WHERE webhook = ? AND lane = ? AND head = ?",
                        (after, now, row[0], row[1], seq))
            for seq, retry_at, why in failed:
                row = self._db.execute(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = ?"
                    " WHERE seq = ? AND delivered_at IS NULL RETURNING webhook, lane",
                    (why, seq)).fetchone()
                if row is not None:
                    self._db.execute(
                        "UPDATE outbox_lanes SET next_at = ?, claimed_by = NULL,"
                        " claimed_until = NULL WHERE webhook = ? AND lane = ? AND head = ?",
                        (retry_at, row[0], row[1], seq))

    def forget_claims(self) -> None:
        with self._write():
            self._db.execute("UPDATE outbox_lanes SET claimed_by = NULL, claimed_until = NULL"
                             " WHERE claimed_until IS NOT NULL")

    def outbox_stats(self) -> dict[str, OutboxStats]:
        counts = self._db.execute(
            "SELECT webhook, count(*) FROM outbox INDEXED BY outbox_waiting"
            " WHERE delivered_at IS NULL GROUP BY webhook").fetchall()
        # The oldest waiting event is the head of some lane.
        oldest = dict(self._db.execute(
            "SELECT l.webhook, min(o.created_at) FROM outbox_lanes l"
            " JOIN outbox o ON o.seq = l.head GROUP BY l.webhook").fetchall())
        return {w: OutboxStats(n, oldest.get(w)) for w, n in counts}

    def prune_events(self, delivered_before: float, give_up: dict[str, float],
                     default_give_up: float) -> tuple[int, int]:
        with self._write():
            delivered = self._db.execute(
                "DELETE FROM outbox WHERE delivered_at IS NOT NULL AND delivered_at < ?",
                (delivered_before,)).rowcount
            dropped = 0
            for webhook, before in give_up.items():
                dropped += self._db.execute(
                    "DELETE FROM outbox WHERE delivered_at IS NULL AND webhook = ?"
                    " AND created_at < ?", (webhook, before)).rowcount
            marks = ", ".join("?" * len(give_up))
            dropped += self._db.execute(
                f"DELETE FROM outbox WHERE delivered_at IS NULL AND created_at < ?"
                f" AND webhook NOT IN ({marks})", (default_give_up, *give_up)).rowcount
            if dropped:  # lanes whose head went: gone, or on to their next event
                self._db.execute(
                    "DELETE FROM outbox_lanes WHERE NOT EXISTS (SELECT 1 FROM outbox o"
                    " WHERE o.webhook = outbox_lanes.webhook AND o.lane = outbox_lanes.lane"
                    " AND o.delivered_at IS NULL)")
                self._db.execute(
                    "UPDATE outbox_lanes SET head = (SELECT min(o.seq) FROM outbox o"
                    " WHERE o.webhook = outbox_lanes.webhook AND o.lane = outbox_lanes.lane"
                    " AND o.delivered_at IS NULL), next_at = 0, claimed_by = NULL,"
                    " claimed_until = NULL"
                    " WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.seq = outbox_lanes.head"
                    " AND o.delivered_at IS NULL)")
        return delivered, dropped


class SQLiteStore(_Counts, _Tokens, _Passkeys, _Outbox):
    """The default :class:`proxy.store.Store`. Not thread-safe: one thread at a time."""

    def __init__(self, path: Path | str, *, migrate: bool = True) -> None:
        """Open (or create) the store. An empty one is brought to the latest
        schema; an older one only with ``migrate`` (``legacy-auth-proxy
        migrate``), else :class:`SchemaOutdated` says what to run."""
        self.path = Path(path)
        if str(path) != ":memory:":
            self._create_private(self.path)
        try:
            self._db = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=OPEN_TIMEOUT
            )
            self._db.row_factory = sqlite3.Row
            self._use_wal()
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA trusted_schema = OFF")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:  # locked, unreadable, not a database
            raise self._unusable(e) from None
        if 0 < version < len(MIGRATIONS) and not migrate:
            self._db.close()
            raise SchemaOutdated(
                f"{self.path}: the store's schema is version {version}; this version of "
                f"legacy-auth-proxy needs {len(MIGRATIONS)}: back it up, then run "
                f"'legacy-auth-proxy migrate'"
            )
        if version != len(MIGRATIONS):
            self._migrate()

    def _use_wal(self) -> None:
        """Switch to WAL mode, waiting for another process that opens the
        store at the same time: SQLite answers "locked" to a change of
        journal mode at once, without the busy timeout that other statements wait."""
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)

    @staticmethod
    def _create_private(path: Path) -> None:
        """Create the database file readable by its owner only, before SQLite
        creates it with the process's umask. SQLite gives the -wal and -shm
        files the same mode."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError as e:
            raise StoreError(f"{path}: cannot create the database: {e.strerror}") from None
        os.close(fd)
        adopt_parent_owner(path)

    def _migrate(self) -> None:
        # Only an old schema takes a write: opening a current store needs no lock.
        with self._write():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise SchemaTooNew(
                    f"{self.path}: schema version {version} is newer than this "
                    f"version of legacy-auth-proxy knows ({len(MIGRATIONS)})"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction: all of it lands, or none of it."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._unusable(e) from None
        try:
            yield
        except BaseException as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):
                raise self._unusable(e) from None
            raise
        else:
            try:
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise self._unusable(e) from None

    def _unusable(self, error: sqlite3.DatabaseError) -> StoreError:
        """What went wrong, in words for an operator; nothing was changed."""
        text = str(error)
        if "locked" in text or "busy" in text:
            why = "the store is locked by another process (a backup, a stuck command?); try again"
        elif "full" in text:
            why = "the disk is full"
        elif "readonly" in text or "read-only" in text:
            why = "the store cannot be written (a read-only file or file system)"
        else:
            why = f"the store cannot be used: {text}"
        return StoreError(f"{self.path}: {why}; nothing was changed")

    def _log_change(self, now: float, username: str, kind: str, id: str | None) -> None:
        self._db.execute(
            "INSERT INTO changes (at, username, kind, app_password_id) VALUES (?, ?, ?, ?)",
            (now, username, ChangeKind(kind).value, id),
        )
        self._db.execute("DELETE FROM changes WHERE at < ?", (now - CHANGE_RETENTION,))

    # -- app passwords -------------------------------------------------------

    def create_app_password(
        self,
        *,
        username: str,
        name: str,
        lookup_key: bytes,
        password_hash: str,
        created_by: str,
        now: float,
        expires_at: float | None,
        protocols: frozenset[str] | None,
        limit: int,
        networks: tuple[str, ...] | None = None,
    ) -> AppPassword:
        record = AppPassword(
            id=secrets.token_hex(5),
            username=username,
            name=name,
            created_at=now,
            created_by=created_by,
            expires_at=expires_at,
            protocols=protocols,
            networks=networks,
        )
        with self._write():
            # Those that stopped working by themselves do not count.
            count = self._db.execute(
                "SELECT count(*) FROM app_passwords WHERE username = ? AND stopped_at IS NULL"
                " AND (expires_at IS NULL OR expires_at > ?)",
                (username, now),
            ).fetchone()[0]
            if count >= limit:
                raise LimitReached(username, count, limit)
            try:
                self._db.execute(
                    "INSERT INTO app_passwords (id, username, name, lookup_key, password_hash,"
                    " created_at, created_by, expires_at, protocols, networks)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        username,
                        name,
                        lookup_key,
                        password_hash,
                        now,
                        created_by,
                        expires_at,
                        ",".join(sorted(protocols)) if protocols is not None else None,
                        ",".join(networks) if networks is not None else None,
                    ),
                )
            except sqlite3.IntegrityError as e:
                message = str(e)
                if "app_passwords.username, app_passwords.name" in message:
                    raise NameTaken(username, name) from None
                if message.startswith("UNIQUE"):
                    # A lookup key or id collision: odds of 2**-75 and 2**-40.
                    # Say nothing of which; the caller may simply try again.
                    raise StoreError("could not store the app password; try again") from None
                raise
        return record

    def list_app_passwords(self, username: str) -> list[AppPassword]:
        rows = self._db.execute(
            f"SELECT {COLUMNS} FROM app_passwords WHERE username = ? ORDER BY created_at, id",
            (username,),
        )
        return [app_password_from(row) for row in rows]

    def page_app_passwords(self, after: str | None, limit: int) -> list[AppPassword]:
        rows = self._db.execute(
            f"SELECT {COLUMNS} FROM app_passwords WHERE id > ? ORDER BY id LIMIT ?",
            (after or "", limit),
        )
        return [app_password_from(row) for row in rows]

    def has_app_passwords(self) -> bool:
        return self._db.execute("SELECT 1 FROM app_passwords LIMIT 1").fetchone() is not None

    def find_app_password(self, username: str, id_or_name: str) -> AppPassword | None:
        """By id first, then by name: ids are what scripts use, names what people type."""
        for column in ("id", "name"):
            row = self._db.execute(
                f"SELECT {COLUMNS} FROM app_passwords WHERE username = ? AND {column} = ?",
                (username, id_or_name),
            ).fetchone()
            if row is not None:
                return app_password_from(row)
        return None

    def find_by_lookup_key(self, lookup_key: bytes) -> tuple[AppPassword, str] | None:
        row = self._db.execute(
            f"SELECT {COLUMNS}, password_hash FROM app_passwords WHERE lookup_key = ?",
            (lookup_key,),
        ).fetchone()
        return None if row is None else (app_password_from(row), row["password_hash"])

    def delete_app_password(self, username: str, id: str, now: float) -> AppPassword | None:
        with self._write():
            row = self._db.execute(
                f"DELETE FROM app_passwords WHERE username = ? AND id = ? RETURNING {COLUMNS}",
                (username, id),
            ).fetchone()
            if row is None:
                return None
            self._log_change(now, username, "deleted", id)
        return app_password_from(row)

    def revoke_all(self, username: str, now: float) -> list[AppPassword]:
        with self._write():
            rows = self._db.execute(
                f"DELETE FROM app_passwords WHERE username = ? RETURNING {COLUMNS}",
                (username,),
            ).fetchall()
            self._log_change(now, username, "revoked_all", None)
        return sorted((app_password_from(r) for r in rows), key=lambda a: (a.created_at, a.id))

    def stop_created_before(self, username: str, when: float, now: float) -> list[AppPassword]:
        """Stop the user's working app passwords made before ``when`` (a
        primary password change): kept listed as stopped, one change-feed
        entry each, in one transaction."""
        with self._write():
            rows = self._db.execute(
                f"UPDATE app_passwords SET stopped_at = ?, stopped_reason = 'password_change'"
                f" WHERE username = ? AND created_at < ? AND stopped_at IS NULL"
                f" AND (expires_at IS NULL OR expires_at > ?) RETURNING {COLUMNS}",
                (now, username, when, now),
            ).fetchall()
            for row in rows:
                self._log_change(now, username, "stopped", row["id"])
        return sorted((app_password_from(r) for r in rows), key=lambda a: (a.created_at, a.id))

    def sweep(self, now: float, idle_expiry: float | None) -> list[AppPassword]:
        """Mark app passwords that expired or went unused for ``idle_expiry``
        as stopped (returned), and delete those stopped longer than
        :data:`STOPPED_KEPT`."""
        with self._write():
            # Forgotten first: what is being stopped now is never among them.
            self._db.execute(
                "DELETE FROM app_passwords WHERE stopped_at < ?", (now - STOPPED_KEPT,)
            )
            self._db.execute("DELETE FROM failures WHERE at < ?", (now - FAILURES_KEPT,))
            self._db.execute("DELETE FROM lockouts WHERE until < ?", (now - FAILURES_KEPT,))
            rows = self._db.execute(
                f"UPDATE app_passwords SET stopped_at = expires_at, stopped_reason = 'expired'"
                f" WHERE stopped_at IS NULL AND expires_at <= ? RETURNING {COLUMNS}",
                (now,),
            ).fetchall()
            if idle_expiry:
                rows += self._db.execute(
                    f"UPDATE app_passwords SET stopped_at = coalesce(last_used_at, created_at) + ?,"
                    f" stopped_reason = 'unused' WHERE stopped_at IS NULL"
                    f" AND coalesce(last_used_at, created_at) <= ? RETURNING {COLUMNS}",
                    (idle_expiry, now - idle_expiry),
                ).fetchall()
            for row in rows:
                self._log_change(now, row["username"], "stopped", row["id"])
        return sorted((app_password_from(r) for r in rows), key=lambda a: (a.created_at, a.id))

    def record_use(
        self, id: str, at: float, address: str | None, protocol: str, count: int = 1
    ) -> None:
        with self._write():
            self._db.execute(
                "UPDATE app_passwords SET last_used_at = ?, last_used_address = ?,"
                " last_used_protocol = ?, use_count = use_count + ? WHERE id = ?",
                (at, address, protocol, count, id),
            )

    def replace_hash(self, id: str, password_hash: str) -> None:
        with self._write():
            self._db.execute(
                "UPDATE app_passwords SET password_hash = ? WHERE id = ?", (password_hash, id)
            )

    # -- users ---------------------------------------------------------------

    def get_user(self, username: str) -> User:
        row = self._db.execute(
            "SELECT mfa_state, mfa_registered_at FROM users WHERE username = ?", (username,)
        ).fetchone()
        if row is None:
            return User(username)
        return User(username, MfaState(row["mfa_state"]), row["mfa_registered_at"])

    def set_user(self, user: User, now: float, expected: User | None = None) -> User:
        with self._write():
            if expected is not None and self.get_user(user.username) != expected:
                raise Conflict(f"the state of {user.username} changed since it was read")
            self._db.execute(
                "INSERT INTO users (username, mfa_state, mfa_registered_at, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (username) DO UPDATE SET"
                " mfa_state = excluded.mfa_state,"
                " mfa_registered_at = excluded.mfa_registered_at,"
                " updated_at = excluded.updated_at",
                (user.username, user.mfa_state.value, user.mfa_registered_at, now),
            )
            self._log_change(now, user.username, "state_changed", None)
        return user

    # -- second factor -------------------------------------------------------

    def get_totp(self, username: str) -> tuple[bytes, int] | None:
        """The user's sealed TOTP key and the last time step used, if enrolled."""
        row = self._db.execute(
            "SELECT totp, last_step FROM second_factors WHERE username = ?", (username,)
        ).fetchone()
        return None if row is None else (bytes(row["totp"]), row["last_step"])

    def add_totp(self, username: str, sealed: bytes, step: int, now: float) -> bool:
        """Enrol the user's TOTP key (``step`` is the one that confirmed it);
        False if they have one already: a key is only ever replaced by
        resetting it first (the help desk), never by a second enrolment."""
        with self._write():
            added = self._db.execute(
                "INSERT INTO second_factors (username, totp, created_at, last_step)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (username) DO NOTHING",
                (username, sealed, now, step),
            ).rowcount
        return bool(added)

    def delete_totp(self, username: str, now: float) -> bool:
        with self._write():
            gone = self._db.execute(
                "DELETE FROM second_factors WHERE username = ?", (username,)
            ).rowcount
            self._log_change(now, username, "second_factor_reset", None)
        return bool(gone)

    def use_totp_step(self, username: str, step: int) -> bool:
        """Take time step ``step`` of the user's TOTP: True once, False if it
        (or a later one) was used already: a code is never accepted twice,
        by this process or any other sharing the store."""
        with self._write():
            taken = self._db.execute(
                "UPDATE second_factors SET last_step = ? WHERE username = ? AND last_step < ?",
                (step, username, step),
            ).rowcount
        return bool(taken)

    # -- failed sign-ins, shared -----------------------------------------------

    def note(self, username: str, kind: str, now: float) -> None:
        """Tell every daemon something of the user through the change feed
        (``unlocked``: lift their lockouts)."""
        with self._write():
            self._log_change(now, username, kind, None)

    # -- change feed ---------------------------------------------------------

    def changes_since(self, seq: int) -> list[Change]:
        rows = self._db.execute(
            "SELECT seq, at, username, kind, app_password_id FROM changes"
            " WHERE seq > ? ORDER BY seq",
            (seq,),
        )
        return [Change(r["seq"], r["at"], r["username"], ChangeKind(r["kind"]), r["app_password_id"]) for r in rows]

    def last_change(self) -> int:
        row = self._db.execute("SELECT max(seq) FROM changes").fetchone()
        return row[0] or 0

    def integrity_check(self) -> str:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        self._db.close()
