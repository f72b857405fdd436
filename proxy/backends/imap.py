"""Logging in to the real IMAP server as the user, then relaying bytes.

The backend trusts the proxy as a master user: SASL PLAIN with the user as
authorization identity (RFC 4616; Dovecot master users), or Dovecot's
``user*master`` LOGIN form; or the proxy logs in as the user with an access
token of its app registration, SASL XOAUTH2 or OAUTHBEARER (``oauth2``).
Where the backend trusts the proxy's address, an ``ID`` command first passes
on the client's address and port (``x-originating-ip``,
``x-originating-port``) and a session id; nothing the client itself sent in
an ``ID`` is passed on.
"""

from __future__ import annotations

import itertools
import re
import secrets

import attrs

from proxy.backends import BackendConnection, BackendRefused, MasterLogin, TokenRefused
from proxy.backends.tokens import TOKEN_REFUSED, refusal
from proxy.transports import write_now
from proxy.wire.imap import quote

_CAPABILITY = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)

# A login's session id for the backend's logs: this process's random
# prefix and a count, unique without a system call (getrandom) a login.
# Workers are processes of their own (spawned, not forked), each with its
# own prefix.
_PROCESS = secrets.token_hex(4)
_LOGINS = itertools.count(1)


def session_id() -> bytes:
    return f"{_PROCESS}{next(_LOGINS):x}".encode()


def send(connection: BackendConnection, tag: bytes, line: bytes) -> None:
    write_now(connection.transport, tag + b" " + line + b"\r\n")


async def answer(connection: BackendConnection, tag: bytes,
                 continuation: bytes | tuple[bytes, ...] | None = None) -> bytes:
    """The tagged answer's line to the command tagged ``tag``. Untagged lines
    are read and kept only for capabilities; continuation requests get
    ``continuation`` (one, or several in turn). A refusal whose last
    challenge says the bearer token was refused is :class:`TokenRefused`."""
    pending = [continuation] if isinstance(continuation, bytes) else list(continuation or ())
    challenge = b""
    while True:
        line = await connection.line()
        if line.startswith(b"+") and pending:
            challenge = line[1:]
            write_now(connection.transport, pending.pop(0) + b"\r\n")
            continue
        if line.upper().startswith(b"* CAPABILITY "):
            connection.capabilities = line[len(b"* CAPABILITY ") :]
        if line.startswith(tag + b" "):
            status = line[len(tag) + 1 :].split(b" ", 1)[0].upper()
            if status != b"OK":
                text = line[len(tag) + 1 :].decode("utf-8", "replace")[:200]
                why = refusal(challenge) if challenge.strip() else ""
                if why in TOKEN_REFUSED:
                    raise TokenRefused(f"{text} (token: {why})")
                raise BackendRefused(f"{text} (token: {why})" if why else text)
            found = _CAPABILITY.search(line)
            if found:
                connection.capabilities = found.group(1)
            return line


async def command(
    connection: BackendConnection, tag: bytes, line: bytes, continuation: bytes | None = None
) -> bytes:
    """Send an IMAP command; the tagged answer's line."""
    send(connection, tag, line)
    return await answer(connection, tag, continuation)


@attrs.define
class IMAPBackend(MasterLogin):
    """login_style: "sasl" or "dovecot"."""

    goodbye: bytes = b"lapz LOGOUT\r\n"

    async def prepare(self, connection: BackendConnection) -> None:
        greeting = await connection.line()
        if not greeting.upper().startswith(b"* OK"):
            raise BackendRefused("the IMAP backend did not greet with OK")
        found = _CAPABILITY.search(greeting)
        if found:
            connection.capabilities = found.group(1)
        if self.starttls is not None:
            await command(connection, b"lap0", b"STARTTLS")
            connection.start_tls(self.starttls)
            connection.capabilities = b""
        if not connection.capabilities:
            await command(connection, b"lap2", b"CAPABILITY")

    async def finish(
        self, connection: BackendConnection, username: str, address: str, port: int,
        token: str | None = None,
    ) -> None:
        # ID and the login go together: one round trip (RFC 3501 5.5), one
        # write (each send wakes the backend: a system call's worth of CPU).
        lines: list[bytes] = []

        def queue(tag: bytes, line: bytes) -> None:
            lines.append(tag + b" " + line + b"\r\n")

        if self.pass_client_address:
            fields = [
                (b"x-originating-ip", address.encode()),
                (b"x-originating-port", str(port).encode()),
                (b"x-session-ext-id", session_id()),
            ]
            pairs = b" ".join(quote(k) + b" " + quote(v) for k, v in fields)
            queue(b"lap1", b"ID (" + pairs + b")")
        offered = connection.capabilities.upper().split()
        connection.capabilities = b""
        continuation: bytes | tuple[bytes, ...] | None = None
        if self.oauth is not None:
            assert token is not None
            # A refusal comes as a challenge to be answered with a dummy
            # (RFC 7628 3.2.3), then NO.
            mechanism = self.oauth.mechanism.encode()
            initial = self.oauth.initial(username, token)
            if b"SASL-IR" in offered:
                queue(b"lap3", b"AUTHENTICATE " + mechanism + b" " + initial)
                continuation = self.oauth.dummy
            else:
                queue(b"lap3", b"AUTHENTICATE " + mechanism)
                continuation = (initial, self.oauth.dummy)
        elif self.login_style == "dovecot":
            login = quote(f"{username}*{self.master_user}") + b" " + quote(self.master_password)
            queue(b"lap3", b"LOGIN " + login)
        elif b"SASL-IR" in offered:
            queue(b"lap3", b"AUTHENTICATE PLAIN " + self.plain(username))
        else:
            queue(b"lap3", b"AUTHENTICATE PLAIN")
            continuation = self.plain(username)
        write_now(connection.transport, b"".join(lines))
        if self.pass_client_address:
            await answer(connection, b"lap1")
            connection.capabilities = b""  # only what the login's answer says counts
        await answer(connection, b"lap3", continuation)
        if not connection.capabilities:
            await command(connection, b"lap4", b"CAPABILITY")
