"""The decision on a sign-in with an OAuth access token (SASL XOAUTH2 and
OAUTHBEARER): the token checked first (:mod:`proxy.auth.bearer`), with no
directory look-up for a bad one, so that it tells nothing of which names
exist; then the user it names against the account signing in; then the
account as for any sign-in (:func:`proxy.auth.rules.account_refusal`, the
throttle's lockout). A bad token is not a guess at the account's secret: it
never locks the account (the Authenticator holds its answer for the
source's failure delay, as every refusal's).
"""

from __future__ import annotations

from twisted.logger import Logger

from proxy import apppasswords
from proxy.auth import Attempt, Decision, Reason, rules
from proxy.auth.accounts import Accounts
from proxy.auth.bearer import BearerTokens, InvalidToken, KeysUnavailable
from proxy.auth.lockouts import Lockouts
from proxy.directory import DirectoryUnavailable

log = Logger(namespace="legacy_auth_proxy.auth")


class BearerSignIn:
    """Decides sign-ins with an access token. ``tokens``: the oauth
    section's token checker, None where it is not configured (set by the
    daemon's builder)."""

    def __init__(self, accounts: Accounts, lockouts: Lockouts) -> None:
        self._accounts = accounts
        self._lockouts = lockouts
        self.tokens: BearerTokens | None = None

    def offered(self, realm: str) -> bool:
        """Whether a listener of ``realm`` offers XOAUTH2 and OAUTHBEARER:
        cloud listeners, where the oauth section is configured."""
        return self.tokens is not None and realm == "cloud"

    async def decide(self, attempt: Attempt) -> Decision:
        typed = apppasswords.canonical_username(attempt.username)
        if self.tokens is None or not self.offered(attempt.realm):
            return Decision(Reason.INVALID_TOKEN, typed)
        try:
            claims = await self.tokens.verify(attempt.secret)
        except KeysUnavailable:
            return Decision(Reason.PROVIDER_UNAVAILABLE, typed)
        except InvalidToken as e:
            log.info("{address}: an access token for {user} refused: {why}",
                     address=attempt.client_address, user=typed, why=e.reason)
            return Decision(Reason.INVALID_TOKEN, typed)
        names = self.tokens.names(claims)
        if not typed:
            # OAUTHBEARER without a=: the user is the one the token names.
            if not names or rules.malformed_name(names[0]):
                return Decision(Reason.MALFORMED, "")
            typed = apppasswords.canonical_username(names[0])
        try:
            account, owed = await self._accounts.look_up(attempt.username.strip() or typed)
        except DirectoryUnavailable:
            return Decision(Reason.DIRECTORY_UNAVAILABLE, typed)
        if account is None:
            return Decision(Reason.UNKNOWN_USER, typed, owed=owed)
        named = {apppasswords.canonical_username(n) for n in names}
        own = {typed, account.username} | ({apppasswords.canonical_username(account.mail)}
                                           if account.mail else set())
        if not named & own:
            return Decision(Reason.TOKEN_FOR_ANOTHER_USER, account.username, account)
        refused = rules.account_refusal(attempt, account)
        if refused is not None:
            return refused
        if self._lockouts.locked(account, attempt.client_address):
            return Decision(Reason.LOCKED_OUT, account.username, account)
        return Decision(Reason.BEARER_TOKEN, account.username, account)
