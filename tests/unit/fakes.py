"""Stand-ins for the unit layer: the directory and the pools are fakes
behind their interfaces; the store is the real SQLite store, reached
through a pool that runs calls inline, so that everything is decided in
one reactor turn of a ``task.Clock``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from proxy import apppasswords
from proxy.admin import Admin
from proxy.audit import AuditLog
from proxy.auth.authenticator import Authenticator
from proxy.config import CacheConfig, DirectoryConfig, PolicyConfig, ThrottleConfig
from proxy.directory import Account, DirectoryUnavailable
from proxy.store.sqlite import SQLiteStore
from proxy.threads import Busy, Threaded

FAST = apppasswords.HashParameters(time_cost=1, memory_kib=1024, parallelism=1)
PEOPLE = "ou=people,dc=example,dc=test"


class Inline:
    """A pool that runs each call at once, on the caller's thread; ``busy``
    makes it refuse, as a full pool does."""

    def __init__(self) -> None:
        self.busy = False
        self.calls = 0

    def submit(self, function: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if self.busy:
            return fail(Busy("inline pool busy"))
        self.calls += 1
        try:
            return succeed(function(*args, **kwargs))
        except Exception as e:
            return fail(e)


class FakeDirectory:
    """Accounts and passwords in a dict. ``down`` makes every call fail as an
    unreachable directory does; ``gate`` holds password checks until fired,
    ``lookup_gate`` look-ups of accounts."""

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.passwords: dict[str, str] = {}
        self.down = False
        self.busy = False  # with down: calls fail, but the directory itself answers
        self.gate: Deferred[None] | None = None
        self.lookup_gate: Deferred[None] | None = None
        self.checks = 0
        self.resolves = 0

    def add(self, uid: str, password: str, **fields: Any) -> Account:
        account = Account(dn=f"uid={uid},{PEOPLE}", username=uid, active=True, **fields)
        self.accounts[uid] = account
        self.passwords[account.dn] = password
        return account

    def change(self, uid: str, **fields: Any) -> Account:
        account = attrs.evolve(self.accounts[uid], **fields)
        self.accounts[uid] = account
        return account

    def answering(self) -> bool:
        return not self.down or self.busy

    async def resolve(self, username: str) -> Account | None:
        self.resolves += 1
        if self.down:
            raise DirectoryUnavailable("the directory is down")
        if self.lookup_gate is not None:
            await self.lookup_gate
        name = username.lower()
        for account in self.accounts.values():
            if name in (account.username, f"{account.username}@example.test", account.dn.lower()):
                return account
        return None

    async def check_password(self, dn: str, password: str) -> bool:
        self.checks += 1
        if self.down:
            raise DirectoryUnavailable("the directory is down")
        if self.gate is not None:
            await self.gate
        return self.passwords.get(dn) == password


@attrs.define
class Core:
    """An Authenticator on a task.Clock, with a fake directory, the real
    store and the operator's Admin beside it."""

    folder: Path
    clock: Clock = attrs.Factory(Clock)
    directory: FakeDirectory = attrs.Factory(FakeDirectory)
    events: list[dict] = attrs.Factory(list)
    hash_pool: Inline = attrs.Factory(Inline)
    store: Any = None
    admin: Admin | None = None
    auth: Authenticator | None = None
    sessions: Any = None
    # Another Authenticator on the same store and directory: a second process.
    sibling: Any = None

    def build(self, *, policy: PolicyConfig | None = None, throttle: ThrottleConfig | None = None,
              cache: CacheConfig | None = None, shared_failures: bool = False,
              **directory: Any) -> Authenticator:
        pepper = apppasswords.load_pepper(self.folder / "pepper", create=True)
        self.store = SQLiteStore(self.folder / "store.sqlite3")
        self.admin = Admin(store=self.store, hasher=apppasswords.Hasher(FAST), pepper=pepper,
                           audit=AuditLog(None, self.clock.seconds), policy=PolicyConfig(),
                           clock=lambda: self.clock.seconds() or 1.0, actor="cli:test")
        config = DirectoryConfig(**{
            "url": "ldap://directory.example.test", "bind_dn": "cn=proxy,dc=example,dc=test",
            "bind_password_file": self.folder / "unused", "user_base": PEOPLE,
            "account_cache": 0.0, **directory,
        })
        self.sibling = lambda: Authenticator(
            clock=self.clock,
            policy=policy or PolicyConfig(),
            throttle=throttle or ThrottleConfig(source_delay=0, source_delay_max=0),
            cache=cache or CacheConfig(),
            directory_config=config,
            directory=self.directory,
            store=Threaded(self.store, Inline()),
            hash_pool=self.hash_pool,
            hasher=apppasswords.Hasher(FAST),
            pepper=pepper,
            record=lambda event, **fields: self.events.append({"event": event, **fields}),
            shared_failures=shared_failures,
        )
        self.auth = self.sibling()
        return self.auth
