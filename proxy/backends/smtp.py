"""Logging in to the real submission server as the user, then relaying bytes.

The backend trusts the proxy either as a SASL master user (PLAIN with the
user as authorization identity: Dovecot submission) or through Postfix's
XCLIENT (``LOGIN=`` and ``ADDR=``, from an address Postfix lists in
``smtpd_authorized_xclient_hosts``). Where the backend offers XCLIENT and the
operator wants it, the client's address is passed on before a SASL login too.
With ``oauth2``, the login is as the user with an access token of the
proxy's app registration (SASL XOAUTH2 or OAUTHBEARER), as Exchange Online's
``SMTP.SendAsApp`` and Dovecot's oauth2 passdb take it.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from proxy.backends import BackendConnection, BackendRefused, MasterLogin, TokenRefused, connect
from proxy.backends.tokens import TOKEN_REFUSED, refusal
from proxy.transports import write_now
from proxy.wire.smtp import DEFAULT_EXTENSIONS, passed_extensions, xtext

log = Logger(namespace="legacy_auth_proxy.backends.smtp")


async def reply(connection: BackendConnection) -> tuple[int, list[bytes]]:
    """One SMTP reply, multi-line or not: its code and the text of each line."""
    lines = []
    while True:
        line = await connection.line()
        if len(line) < 3 or not line[:3].isdigit():
            raise BackendRefused("the submission server sent a malformed reply")
        lines.append(line[4:])
        if line[3:4] != b"-":
            return int(line[:3]), lines


async def expect(connection: BackendConnection, command: bytes | None, code: int) -> list[bytes]:
    if command is not None:
        write_now(connection.transport, command + b"\r\n")
    got, lines = await reply(connection)
    if got == 421 and code != 421:
        # Closing the channel (RFC 5321 3.8): as good as closed.
        raise ConnectionError("the submission server is closing the connection")
    if got != code:
        verb = command.split(b" ", 1)[0].decode() if command else "greeting"
        raise BackendRefused(f"{verb}: {got} {b' '.join(lines)[:200].decode('utf-8', 'replace')}")
    return lines


@attrs.define
class SMTPBackend(MasterLogin):
    """login_style: "sasl", "xclient" or "oauth2"."""

    extensions: list[bytes] = attrs.Factory(lambda: list(DEFAULT_EXTENSIONS))
    goodbye: bytes = b"QUIT\r\n"

    async def ready(self) -> None:
        await self.probe()

    async def probe(self) -> None:
        """Learn the backend's extensions, which the proxy's EHLO offers
        before AUTH: the whole dialogue within ``timeout``, or the defaults
        (a server that takes the connection and says nothing must not hold
        the daemon's start or a reload)."""
        connection = BackendConnection(self.reactor)
        try:
            lines = await Deferred.fromCoroutine(self._probe(connection)).addTimeout(
                self.timeout, self.reactor)
            self.extensions = passed_extensions(lines)
        except Exception as e:
            log.warn("cannot read the submission server's extensions: {error}",
                     error=str(e) or type(e).__name__)
        finally:
            connection.close()

    async def _probe(self, connection: BackendConnection) -> list[bytes]:
        await connect(self.endpoint, connection)
        await expect(connection, None, 220)
        lines = await self._ehlo(connection)
        if self.starttls is not None:
            lines = await self._starttls(connection)
        connection.transport.write(b"QUIT\r\n")
        return lines

    async def _ehlo(self, connection: BackendConnection) -> list[bytes]:
        return await expect(connection, b"EHLO " + self.hostname.encode(), 250)

    async def _starttls(self, connection: BackendConnection) -> list[bytes]:
        await expect(connection, b"STARTTLS", 220)
        connection.start_tls(self.starttls)
        return await self._ehlo(connection)

    async def prepare(self, connection: BackendConnection) -> None:
        await expect(connection, None, 220)
        lines = await self._ehlo(connection)
        if self.starttls is not None:
            lines = await self._starttls(connection)
        connection.offered = frozenset(keywords(lines))

    async def finish(
        self, connection: BackendConnection, username: str, address: str, port: int,
        token: str | None = None,
    ) -> None:
        if self.login_style == "xclient":
            command = b"XCLIENT LOGIN=" + xtext(username)
            if self.pass_client_address:
                command += b" ADDR=" + xtext(address) + b" PORT=" + str(port).encode()
            await expect(connection, command, 220)
            await self._ehlo(connection)
            return
        if self.pass_client_address and b"XCLIENT" in connection.offered:
            command = b"XCLIENT ADDR=" + xtext(address) + b" PORT=" + str(port).encode()
            await expect(connection, command, 220)
            await self._ehlo(connection)
        if self.oauth is not None:
            assert token is not None
            await self._bearer(connection, username, token)
            return
        await expect(connection, b"AUTH PLAIN " + self.plain(username), 235)

    async def _bearer(self, connection: BackendConnection, username: str, token: str) -> None:
        """AUTH with the initial response (RFC 4954); a refusal comes as a
        334 challenge, answered with the dummy, then 535 (RFC 7628 3.2.3)."""
        assert self.oauth is not None
        write_now(connection.transport, b"AUTH " + self.oauth.mechanism.encode() + b" "
                  + self.oauth.initial(username, token) + b"\r\n")
        code, lines = await reply(connection)
        why = ""
        if code == 334:
            why = refusal(lines[0] if lines else b"")
            write_now(connection.transport, self.oauth.dummy + b"\r\n")
            code, lines = await reply(connection)
        if code == 235:
            return
        if code == 421:
            raise ConnectionError("the submission server is closing the connection")
        text = f"AUTH: {code} {b' '.join(lines)[:200].decode('utf-8', 'replace')}" + (
            f" (token: {why})" if why else "")
        raise (TokenRefused if why in TOKEN_REFUSED else BackendRefused)(text)


def keywords(lines: Sequence[bytes]) -> set[bytes]:
    return {line.split(b" ", 1)[0].upper() for line in lines[1:]}
