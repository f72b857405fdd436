"""Logging in to the real POP3 server as the user, then relaying bytes.

The backend trusts the proxy as a master user: SASL PLAIN with the user as
authorization identity (``sasl``), or Dovecot's ``USER user*master`` and
``PASS`` (``dovecot``); or as the user with an access token of the
proxy's app registration, SASL XOAUTH2 or OAUTHBEARER (``oauth2``). Where the operator wants it, the client's address is
passed first with ``XCLIENT ADDR= PORT=``, which Dovecot's POP3 login takes
from trusted networks (``login_trusted_networks``).
"""

from __future__ import annotations

import attrs

from proxy.backends import BackendConnection, BackendRefused, MasterLogin, TokenRefused
from proxy.backends.tokens import TOKEN_REFUSED, refusal
from proxy.transports import write_now
from proxy.wire.smtp import xtext


async def command(connection: BackendConnection, line: bytes | None) -> bytes:
    """Send a command (None: read the greeting); its +OK line, or BackendRefused."""
    if line is not None:
        write_now(connection.transport, line + b"\r\n")
    answer = await connection.line()
    if not answer.startswith(b"+OK"):
        verb = line.split(b" ", 1)[0].decode() if line else "greeting"
        raise BackendRefused(f"{verb}: {answer[:200].decode('utf-8', 'replace')}")
    return answer


@attrs.define
class POP3Backend(MasterLogin):
    """login_style: "sasl", "dovecot" or "oauth2"."""

    goodbye: bytes = b"QUIT\r\n"

    async def prepare(self, connection: BackendConnection) -> None:
        await command(connection, None)
        if self.starttls is not None:
            await command(connection, b"STLS")
            connection.start_tls(self.starttls)

    async def finish(
        self, connection: BackendConnection, username: str, address: str, port: int,
        token: str | None = None,
    ) -> None:
        if self.pass_client_address:
            await command(connection, b"XCLIENT ADDR=" + xtext(address) + b" PORT=" + str(port).encode())
        if self.oauth is not None:
            assert token is not None
            await self._bearer(connection, username, token)
            return
        if self.login_style == "dovecot":
            await command(connection, b"USER " + f"{username}*{self.master_user}".encode())
            await command(connection, b"PASS " + self.master_password.encode())
            return
        await command(connection, b"AUTH PLAIN " + self.plain(username))

    async def _bearer(self, connection: BackendConnection, username: str, token: str) -> None:
        """AUTH with the mechanism and the initial response (RFC 5034); a
        refusal's challenge is answered with the dummy, then -ERR."""
        assert self.oauth is not None
        write_now(connection.transport, b"AUTH " + self.oauth.mechanism.encode() + b" "
                  + self.oauth.initial(username, token) + b"\r\n")
        answer = await connection.line()
        why = ""
        if answer.startswith(b"+ ") or answer == b"+":
            why = refusal(answer[2:])
            write_now(connection.transport, self.oauth.dummy + b"\r\n")
            answer = await connection.line()
        if answer.startswith(b"+OK"):
            return
        text = f"AUTH: {answer[:200].decode('utf-8', 'replace')}" + (f" (token: {why})" if why else "")
        raise (TokenRefused if why in TOKEN_REFUSED else BackendRefused)(text)
