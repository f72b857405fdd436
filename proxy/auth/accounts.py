"""What the directory and the store said of accounts lately, by account.

What is known about an account is kept by the account (its DN), never by
the name typed: when one of its names finds it locked or gone, every other
name knows at once. Names are kept as typed: two names that fold to one form
may still be two accounts in the directory. Kept for
``directory.account_cache``; during an outage, an account last seen active
is remembered for ``directory.outage_grace``.
"""

from __future__ import annotations

from typing import Any, Protocol

from proxy.auth.cache import LRU
from proxy.auth.timing import LookupTime, name_form
from proxy.config import DirectoryConfig
from proxy.directory import Account

MAX_ACCOUNTS = 100_000


class DirectoryLike(Protocol):
    async def resolve(self, username: str) -> Account | None: ...

    async def check_password(self, dn: str, password: str) -> bool: ...

    def answering(self) -> bool: ...

    async def find(self, text: str, limit: int) -> list[str]: ...


class Accounts:
    def __init__(self, clock: Any, directory: DirectoryLike, store: Any,
                 config: DirectoryConfig) -> None:
        self._clock = clock
        self._directory = directory
        self._store = store
        self._config = config
        # name as typed → (account key or None for no account, when looked up)
        self._names: LRU[str, tuple[str | None, float]] = LRU(MAX_ACCOUNTS)
        # account key → (the account as last seen, when)
        self._known: LRU[str, tuple[Account, float]] = LRU(MAX_ACCOUNTS)
        # store user name → (the user's state in the store, when read); dropped
        # on every change to the user
        self._users: LRU[str, tuple[Any, float]] = LRU(MAX_ACCOUNTS)
        self._user_changes = 0  # a read that overlapped a change is not kept
        self.lookup_time = LookupTime()

    async def account(self, name: str) -> Account | None:
        """The account ``name`` signs in as (None: no such account). Raises
        :class:`proxy.directory.DirectoryUnavailable`."""
        return (await self.look_up(name))[0]

    async def look_up(self, name: str) -> tuple[Account | None, float]:
        """The account ``name`` signs in as, and how much sooner than a
        look-up that found one the directory said there is none (0 when it
        found one, or the answer was kept): a sign-in's refusal then waits
        that long too, so that the time does not tell (:mod:`proxy.auth.timing`)."""
        now = self._clock.seconds()
        named = self._names.get(name)
        if named is not None and now - named[1] < self._config.account_cache:
            if named[0] is None:
                return None, 0.0
            known = self._known.get(named[0])
            if known is not None:
                return known[0], 0.0
        account = await self._directory.resolve(name)
        spent = self._clock.seconds() - now
        if account is None:
            if named is not None and named[0] is not None:
                self._known.pop(named[0])  # deleted: gone under every name
            self._names.put(name, (None, now))
            return None, self.lookup_time.owed(spent, name_form(name))
        self.lookup_time.found(spent, name_form(name))
        self._names.put(name, (account.key, now))
        self._known.put(account.key, (account, now))
        return account, 0.0

    def cached(self, name: str) -> Account | None:
        """The account ``name`` was found as within ``directory.account_cache``,
        from memory (None: it would have to be asked)."""
        named = self._names.peek(name)
        if named is None or named[0] is None \
                or self._clock.seconds() - named[1] >= self._config.account_cache:
            return None
        known = self._known.peek(named[0])
        return None if known is None else known[0]

    def remembered(self, name: str) -> Account | None:
        """During a directory outage: the account ``name`` last found, if it
        was active when last seen, within the outage grace."""
        named = self._names.peek(name)
        known = self._known.peek(named[0]) if named is not None and named[0] else None
        if known is None or not known[0].active \
                or self._clock.seconds() - known[1] > self._config.outage_grace:
            return None
        return known[0]

    def username_of(self, key: str) -> str | None:
        """The store name of the account known by ``key``."""
        known = self._known.peek(key)
        return None if known is None else known[0].username

    def keys_of(self, username: str) -> list[str]:
        """The keys of the accounts known under the store name ``username``."""
        return [account.key for account, _ in self._known.values() if account.username == username]

    async def user(self, username: str) -> Any:
        """The user's state in the store (MFA), kept for ``directory.account_cache``
        and dropped on every change to the user."""
        ttl = self._config.account_cache
        now = self._clock.seconds()
        kept = self._users.get(username)
        if kept is not None and now - kept[1] < ttl:
            return kept[0]
        changes = self._user_changes
        user = await self._store.get_user(username)
        if ttl > 0 and self._user_changes == changes:  # nothing changed meanwhile
            self._users.put(username, (user, now))
        return user

    def user_changed(self, username: str | None = None) -> None:
        """Forget the store state of ``username`` (None: of everyone)."""
        self._user_changes += 1
        if username is None:
            self._users.clear()
        else:
            self._users.pop(username)
