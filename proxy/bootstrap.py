"""Opening what both the daemon and the command line need, blocking: the
store, the pepper, the directory's secrets, and an Admin over them.

Both ``proxy.service`` and ``proxy.cli`` (and the demo) import this, so the
command line does not import the daemon to open the store.
"""

from __future__ import annotations

import getpass
import os
import time
from pathlib import Path
from typing import Any

import attrs

from proxy import apppasswords, config as configuration
from proxy.admin import Admin
from proxy.audit import AuditLog
from proxy.directory import Directory
from proxy.store import StoreError, StoreUnavailable
from proxy.store.outbox import OutboxAudit
from proxy.store.sqlite import SQLiteStore


class StartupError(Exception):
    """The daemon cannot start with this config and state; the text says why."""


class StoreUnreachable(StartupError):
    """The store cannot be reached now: starting again later may work
    (EX_TEMPFAIL), unlike the other startup errors, which need a person."""


@attrs.frozen
class State:
    """The store and the pepper, opened and checked together."""

    store: Any  # SQLiteStore or PostgresStore
    pepper: bytes


def open_store(config: configuration.Config, *, migrate: bool = False) -> Any:
    """The configured store, opened; blocking. An older schema is an error
    unless ``migrate`` (``legacy-auth-proxy migrate``)."""
    store_config = config.store
    try:
        if store_config.url is not None:
            from proxy.store.postgres import PostgresStore

            password = None
            if store_config.password_file is not None:
                password = read_password(store_config.password_file, "store.password_file")
            return PostgresStore(store_config.url, password=password,
                                 pool_size=store_config.pool_size, timeout=store_config.timeout,
                                 migrate=migrate)
        folder = store_config.path.parent
        if not folder.is_dir():
            raise StartupError(f"{folder}: the store's folder does not exist")
        return SQLiteStore(store_config.path, migrate=migrate)
    except StoreUnavailable as e:
        raise StoreUnreachable(str(e)) from None
    except StoreError as e:
        raise StartupError(str(e)) from None


def open_state(config: configuration.Config, *, migrate: bool = False) -> State:
    """Open the store and read the pepper; blocking.

    The pepper is created on first use, but never beside a store that already
    holds app passwords: a new pepper would silently turn every one of them
    into a wrong secret, so a lost pepper is an error to put right by hand.
    """
    store = open_store(config, migrate=migrate)
    try:
        create = not config.store.pepper_file.exists() and not store.has_app_passwords()
        pepper = apppasswords.load_pepper(config.store.pepper_file, create=create)
    except StoreUnavailable as e:  # gone since it was opened
        store.close()
        raise StoreUnreachable(str(e)) from None
    except apppasswords.PepperError as e:
        store.close()
        hint = ""
        if not config.store.pepper_file.exists():
            hint = (
                "; the store holds app passwords made with a pepper that is now missing: "
                "restore it from a backup, or revoke them all and delete the store"
            )
        raise StartupError(f"{e}{hint}") from None
    return State(store, pepper)


def read_password(path: Path, key: str) -> str:
    """A password kept in a file of its own (``key`` names the setting);
    blocking. The trailing newline is not part of it; an empty one is an error."""
    try:
        password = Directory.read_bind_password(path)
    except OSError as e:
        raise StartupError(f"{path}: {key}: cannot read: {e.strerror}") from None
    if not password:
        raise StartupError(f"{path}: {key} is empty")
    return password


def read_directory_secrets(config: configuration.DirectoryConfig) -> tuple[str, str, bytes | None]:
    """The service account's password, the search account's (or ""), and
    the CA certificates; blocking."""
    password = read_password(config.bind_password_file, "directory.bind_password_file")
    search_password = ""
    if config.search_bind_password_file is not None:
        search_password = read_password(config.search_bind_password_file,
                                         "directory.search_bind_password_file")
    ca = None
    if config.ca_file is not None:
        try:
            ca = config.ca_file.read_bytes()
        except OSError as e:
            raise StartupError(f"{config.ca_file}: directory.ca_file: cannot read: {e.strerror}") from None
        if b"BEGIN CERTIFICATE" not in ca:
            raise StartupError(f"{config.ca_file}: directory.ca_file holds no PEM certificate")
    return password, search_password, ca


def hash_parameters(config: configuration.Config) -> apppasswords.HashParameters:
    h = config.hashing
    return apppasswords.HashParameters(h.time_cost, h.memory_kib, h.parallelism)


def open_admin(config: configuration.Config, actor: str) -> Admin:
    """An Admin over the configured store, acting as ``actor`` (``cli:NAME``);
    blocking. Closing it closes the store."""
    state = open_state(config)
    audit: Any = AuditLog(config.audit.file, time.time)
    if config.webhooks:  # the command line's events reach the webhooks too
        audit = OutboxAudit(audit, state.store, config.webhooks, time.time)
    return Admin(
        store=state.store,
        hasher=apppasswords.Hasher(hash_parameters(config)),
        pepper=state.pepper,
        audit=audit,
        policy=config.policy,
        clock=time.time,
        actor=actor,
    )


def command_line_actor() -> str:
    """Who runs the command, for the audit log: the person behind sudo if any."""
    who = os.environ.get("SUDO_USER")
    if not who:
        try:
            who = getpass.getuser()
        except (KeyError, OSError):
            who = f"uid {os.getuid()}"
    return f"cli:{who}"
