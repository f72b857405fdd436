"""Logging in to the real POP3 server as the user, then relaying bytes.

The backend trusts the proxy as a master user: SASL PLAIN with the user as
authorization identity (``sasl``), or Dovecot's ``USER user*master`` and
``PASS`` (``dovecot``). Where the operator wants it, the client's address is
passed first with ``XCLIENT ADDR= PORT=``, which Dovecot's POP3 login takes
from trusted networks (``login_trusted_networks``).
"""

from __future__ import annotations

import attrs

from proxy.backends import BackendConnection, BackendRefused, MasterLogin
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
    """login_style: "sasl" or "dovecot"."""

    goodbye: bytes = b"QUIT\r\n"

    async def prepare(self, connection: BackendConnection) -> None:
        await command(connection, None)
        if self.starttls is not None:
            await command(connection, b"STLS")
            connection.start_tls(self.starttls)

    async def finish(
        self, connection: BackendConnection, username: str, address: str, port: int
    ) -> None:
        if self.pass_client_address:
            await command(connection, b"XCLIENT ADDR=" + xtext(address) + b" PORT=" + str(port).encode())
        if self.login_style == "dovecot":
            await command(connection, b"USER " + f"{username}*{self.master_user}".encode())
            await command(connection, b"PASS " + self.master_password.encode())
            return
        await command(connection, b"AUTH PLAIN " + self.plain(username))
