"""A real Dovecot as the IMAP and submission backend for integration tests.

`Dovecot(folder)` writes a standalone dovecot.conf (nothing from
/etc/dovecot is read) and runs `dovecot -F` in the foreground, everything in
`folder`: configuration, runtime sockets (run/), state, mail (mail/), the
test PKI from tests/pki.py and the log. It listens on three free loopback
ports:

    imap_port         IMAP, STARTTLS offered but not required
    imaps_port        IMAP over TLS
    pop3_port         POP3, STLS offered but not required
    pop3s_port        POP3 over TLS
    submission_port   SMTP submission, STARTTLS offered but not required

Who may log in:

  * any user name is a mailbox owner (static userdb, allow_all_users): the
    proxy never has to create accounts on the backend;
  * the master user (`master_user`, `master_password`) logs in as anybody,
    either with SASL PLAIN where the authorization identity is the user and
    the authentication identity the master user, or as `user*master` with
    IMAP LOGIN / SASL LOGIN. That is how the proxy opens the user's session
    once it has checked an app password itself;
  * users given a password with add_user() also log in directly, so that
    benchmarks can compare direct logins with proxied ones.

With `oauth2=` (a dict of settings for Dovecot 2.3's oauth2 passdb, written
to dovecot-oauth2.conf.ext), the variant accepts nothing but OAuth: SASL
XOAUTH2 and OAUTHBEARER checked by `passdb { driver = oauth2 }`, no master
user, no passwords (add_user() has no effect there). The usual settings come
from `oauth2_settings()`: JWTs validated locally against the provider's
signing keys (`set_validation_keys()` writes them to the dict Dovecot reads:
`local_validation_key_dict`), the issuer checked, and the token's
`client_id` required to be the proxy's app registration, for any mailbox (as
Exchange Online's IMAP.AccessAsApp: the app is trusted for every user).
`oauth2_introspection_settings()` has Dovecot ask the provider's
introspection endpoint about each token instead.

Plain-text logins are allowed without TLS: the proxy talks to its backend on
loopback. 127.0.0.0/8 is a trusted network, so a proxy there can pass the
client's address with IMAP ID x-originating-ip (the log's rip= is then the
client's, real_rip= the proxy's).

Submission relays every message to an SMTP sink run by the fixture itself
(`SmtpSink`, below), which keeps what it receives for the tests:
sink_messages(), wait_for_messages().

Running as root (the usual case in CI), Dovecot's unprivileged processes
never have to open a path inside `folder`, whose parents (pytest's
/tmp/pytest-of-root/...) only root may enter: the auth process, which reads
the passwd-files, runs as root, and the mail processes (imap, submission,
doveadm save) chroot into <folder>/mail before they become `nobody`. Mail
is in <folder>/mail/users/<user>/Maildir (see maildir()). Run by another
user, every Dovecot process is that user and there is no chroot.

Good to know when writing tests against it:

  * user names are lowercased (auth_username_format %Lu): "Alice" and
    "alice" share one mailbox;
  * a failed login is answered up to 0.5 s late: Dovecot's auth process
    sends failures in batches every 500 ms, even with auth_failure_delay 0;
  * Dovecot 2.3's submission service puts a Received: header before every
    message it relays and has no setting to turn that off: what the client
    sent is SinkMessage.submitted, byte for byte;
  * stop() takes about a second: Dovecot's log process lingers that long.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from tests.pki import make_pki
from tests.ports import free_port
from tests.serverlog import ServerLog

START_TIMEOUT = 15.0  # a healthy dovecot answers in well under a second
STOP_TIMEOUT = 15.0
CLIENT_TIMEOUT = 60.0  # doveadm save of a 10 MB message takes well under 1 s

# Characters Dovecot accepts in a user name (auth_username_chars, default).
USERNAME_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@"
)

# A unix socket path has at most 107 bytes; the longest socket Dovecot makes
# in base_dir is "replication-notify-fifo".
_MAX_BASE_DIR = 107 - len("/replication-notify-fifo")

# The largest message the sink takes (advertised with SIZE); submission is
# limited to 100M (submission_max_mail_size), so the sink never refuses a
# message Dovecot accepted.
SINK_MAX_SIZE = 200 * 1024 * 1024


class DovecotError(RuntimeError):
    """Dovecot, doveadm or the SMTP sink failed; the message has the log tail."""


def _find_tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/bin/{name}")
         if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise DovecotError(f"{name} is not installed")
    return path


def dovecot_username(name: str) -> str:
    """The name Dovecot uses for `name`: auth_username_format is %Lu, so
    "Alice" and "alice" are one mailbox, stored as alice. Raises ValueError
    for a name Dovecot refuses (auth_username_chars)."""
    if not name or not set(name) <= USERNAME_CHARS:
        raise ValueError(f"Dovecot refuses the user name {name!r}: only ASCII letters, "
                         f"digits and .-_@ are allowed")
    return name.lower()  # ASCII only, as checked above: the same as Dovecot's %L


def _passwd_line(name: str, password: str) -> str:
    """A passwd-file line. {PLAIN.B64}: no hashing cost (benchmarks measure
    the proxy, not Dovecot's hashing), and base64 lets any password, even
    one with ':' or a newline, into the line-and-colon format."""
    encoded = base64.b64encode(password.encode()).decode()
    return f"{name}:{{PLAIN.B64}}{encoded}\n"


def _write_private(path: Path, text: str) -> None:
    """Write a file of secrets readable by its owner only, atomically, so
    that Dovecot (which rereads a passwd-file when its mtime changes) never
    reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# -- the SMTP sink ------------------------------------------------------------


@dataclass(frozen=True)
class SinkMessage:
    """One message the sink accepted."""

    mail_from: str  # reverse path without <>, "" for the null sender
    rcpt_to: list[str]  # forward paths without <>, in RCPT order
    data: bytes  # the message exactly as received, dot-unstuffed for DATA
    mail_options: list[str] = field(default_factory=list)  # e.g. BODY=8BITMIME
    helo: str = ""  # the name given with EHLO or HELO
    chunked: bool = False  # sent with BDAT rather than DATA

    @property
    def trace(self) -> bytes:
        """The Received: header Dovecot's submission service put before the
        message (2.3 always adds one; it has no setting to turn it off)."""
        return split_trace(self.data)[0]

    @property
    def submitted(self) -> bytes:
        """The message as the submission client sent it: `data` without the
        Received: header that Dovecot put first."""
        return split_trace(self.data)[1]


# One header field: its first line and the folded lines that continue it.
_RECEIVED = re.compile(rb"Received:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def split_trace(data: bytes) -> tuple[bytes, bytes]:
    """(the leading Received: header field, the rest) of a relayed message;
    (b"", data) if it does not start with one."""
    match = _RECEIVED.match(data)
    return (match.group(0), data[match.end():]) if match else (b"", data)


# The path inside <...>: quoted strings may hold '>'.
_PATH = re.compile(rb'<((?:"(?:[^"\\]|\\.)*"|[^>"])*)>(.*)$')


class SmtpSink:
    """A minimal SMTP server that accepts every message and keeps it.

    It speaks just enough ESMTP for Dovecot's submission relay and common
    clients: EHLO/HELO, MAIL, RCPT, DATA (dot-unstuffed), BDAT (CHUNKING),
    RSET, NOOP, VRFY, HELP, QUIT; it advertises PIPELINING, 8BITMIME,
    SMTPUTF8, SIZE and CHUNKING. No TLS and no AUTH: it is a loopback test
    double. It runs an asyncio loop in a daemon thread; tests read what it
    received from any thread.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 hostname: str = "sink.example.test", max_size: int = SINK_MAX_SIZE):
        self.host = host
        self.port = port  # 0 until the first start() picks one; then kept
        self.hostname = hostname
        self.max_size = max_size
        self._messages: list[SinkMessage] = []
        self._changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._sessions: set[asyncio.Task] = set()

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self.running:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="smtp-sink", daemon=True)
        thread.start()
        try:
            future = asyncio.run_coroutine_threadsafe(
                asyncio.start_server(self._session, self.host, self.port,
                                     limit=self.max_size + 1024 * 1024),
                loop,
            )
            server = future.result(timeout=10)
        except BaseException as error:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            raise DovecotError(f"the SMTP sink cannot listen on {self.host}:{self.port}: "
                               f"{error}") from error
        self._loop, self._thread, self._server = loop, thread, server
        self.port = server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if not self.running:
            return
        loop, thread, server = self._loop, self._thread, self._server

        async def shutdown():
            server.close()
            for task in list(self._sessions):
                task.cancel()
            await asyncio.gather(*self._sessions, return_exceptions=True)
            await server.wait_closed()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = self._server = None

    # -- what tests read ------------------------------------------------------------

    def messages(self) -> list[SinkMessage]:
        with self._changed:
            return list(self._messages)

    def wait_for(self, count: int, timeout: float, since: int = 0) -> list[SinkMessage] | None:
        """messages()[since:] once it has at least `count` messages, None
        after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._messages) - since < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return list(self._messages[since:])

    def _keep(self, message: SinkMessage) -> None:
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()

    # -- the protocol ---------------------------------------------------------------

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._sessions.add(task)
        try:
            await _SinkSession(self, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._sessions.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _SinkSession:
    def __init__(self, sink: SmtpSink, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.sink = sink
        self.reader = reader
        self.writer = writer
        self.helo = ""
        self._reset()

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.rcpt_to: list[str] = []
        self.chunks: list[bytes] = []
        self.chunked_size = 0

    async def reply(self, *lines: str) -> None:
        """One reply: `lines` are "250 text" strings; all but the last get
        the continuation dash."""
        out = []
        for i, line in enumerate(lines):
            code, text = line[:3], line[4:]
            out.append(f"{code}{'-' if i < len(lines) - 1 else ' '}{text}\r\n")
        self.writer.write("".join(out).encode())
        await self.writer.drain()

    async def run(self) -> None:
        await self.reply(f"220 {self.sink.hostname} ESMTP test sink")
        while True:
            try:
                line = await self.reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                await self.reply("500 line too long")
                return
            command = line.rstrip(b"\r\n")
            verb, _, arg = command.partition(b" ")
            handler = getattr(self, f"cmd_{verb.decode('ascii', 'replace').lower()}", None)
            if handler is None or not verb.isalpha():
                await self.reply("502 command not implemented")
                continue
            if await handler(arg.strip()) is False:
                return

    async def cmd_ehlo(self, arg: bytes):
        self.helo = arg.decode("utf-8", "replace")
        self._reset()
        await self.reply(f"250 {self.sink.hostname}", "250 PIPELINING", "250 8BITMIME",
                         "250 SMTPUTF8", f"250 SIZE {self.sink.max_size}", "250 CHUNKING")

    async def cmd_helo(self, arg: bytes):
        self.helo = arg.decode("utf-8", "replace")
        self._reset()
        await self.reply(f"250 {self.sink.hostname}")

    async def cmd_mail(self, arg: bytes):
        if self.mail_from is not None:
            return await self.reply("503 nested MAIL command")
        if not arg[:5].upper() == b"FROM:" or not (match := _PATH.match(arg[5:].lstrip())):
            return await self.reply("501 syntax: MAIL FROM:<address>")
        options = match.group(2).decode("utf-8", "replace").split()
        for option in options:
            name, _, value = option.partition("=")
            if name.upper() == "SIZE" and value.isdigit() and int(value) > self.sink.max_size:
                return await self.reply("552 message size exceeds fixed maximum message size")
        self.mail_from = match.group(1).decode("utf-8", "replace")
        self.mail_options = options
        await self.reply("250 sender ok")

    async def cmd_rcpt(self, arg: bytes):
        if self.mail_from is None:
            return await self.reply("503 need MAIL before RCPT")
        if not arg[:3].upper() == b"TO:" or not (match := _PATH.match(arg[3:].lstrip())):
            return await self.reply("501 syntax: RCPT TO:<address>")
        self.rcpt_to.append(match.group(1).decode("utf-8", "replace"))
        await self.reply("250 recipient ok")

    async def cmd_data(self, arg: bytes):
        if self.mail_from is None or not self.rcpt_to:
            return await self.reply("503 need MAIL and RCPT before DATA")
        if self.chunks:
            return await self.reply("503 DATA after BDAT")
        await self.reply("354 end data with <CR><LF>.<CR><LF>")
        lines = []
        size = 0
        while True:
            line = await self.reader.readuntil(b"\n")
            if line == b".\r\n":
                break
            if line[:1] == b".":  # dot-unstuffing (RFC 5321, 4.5.2)
                line = line[1:]
            lines.append(line)
            size += len(line)
        if size > self.sink.max_size:
            self._reset()
            return await self.reply("552 message size exceeds fixed maximum message size")
        self._finish(b"".join(lines), chunked=False)
        await self.reply(f"250 message accepted ({size} octets)")

    async def cmd_bdat(self, arg: bytes):
        words = arg.split()
        if not words or not words[0].isdigit() or len(words) > 2 or (
                len(words) == 2 and words[1].upper() != b"LAST"):
            # The size is unknown: the connection cannot be kept in sync.
            await self.reply("501 syntax: BDAT <size> [LAST]")
            return False
        size, last = int(words[0]), len(words) == 2
        chunk = await self.reader.readexactly(size)
        if self.mail_from is None or not self.rcpt_to:
            return await self.reply("503 need MAIL and RCPT before BDAT")
        self.chunks.append(chunk)
        self.chunked_size += size
        if self.chunked_size > self.sink.max_size:
            self._reset()
            return await self.reply("552 message size exceeds fixed maximum message size")
        if not last:
            return await self.reply(f"250 {size} octets received")
        total = self.chunked_size
        self._finish(b"".join(self.chunks), chunked=True)
        await self.reply(f"250 message accepted ({total} octets)")

    def _finish(self, data: bytes, chunked: bool) -> None:
        self.sink._keep(SinkMessage(
            mail_from=self.mail_from, rcpt_to=list(self.rcpt_to), data=data,
            mail_options=list(self.mail_options), helo=self.helo, chunked=chunked,
        ))
        self._reset()

    async def cmd_rset(self, arg: bytes):
        self._reset()
        await self.reply("250 reset")

    async def cmd_noop(self, arg: bytes):
        await self.reply("250 ok")

    async def cmd_vrfy(self, arg: bytes):
        await self.reply("252 cannot verify, but will accept")

    async def cmd_help(self, arg: bytes):
        await self.reply("214 EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY QUIT")

    async def cmd_quit(self, arg: bytes):
        await self.reply("221 bye")
        return False


# -- Dovecot ------------------------------------------------------------------

# Dovecots still running, stopped at exit if nobody stopped them (an
# interrupted session, a test that forgot). Each also gets SIGTERM from the
# kernel should the Python process die without running atexit (see _command).
_running: weakref.WeakSet[Dovecot] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop()


def _identity() -> tuple[str, str, str, str, int, int]:
    """(internal user, internal group, login user, mail user, mail uid,
    mail gid) for the processes Dovecot runs.

    As root: the Debian package's dovecot and dovenull for Dovecot's own
    processes, as in any installation, and nobody for the mail processes,
    so that they are neither root nor one of Dovecot's own users. As anybody
    else: that user for everything, the only choice without privileges.
    """
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        group = grp.getgrgid(os.getegid()).gr_name
        return me.pw_name, group, me.pw_name, me.pw_name, me.pw_uid, os.getegid()

    def user(*names: str) -> pwd.struct_passwd:
        for name in names:
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise DovecotError(f"none of the users {', '.join(names)} exists")

    internal = user("dovecot")
    login = user("dovenull", "nobody")
    mail = user("nobody", "dovecot")
    return (internal.pw_name, grp.getgrgid(internal.pw_gid).gr_name, login.pw_name,
            mail.pw_name, mail.pw_uid, mail.pw_gid)


def process_group_members(pgid: int) -> list[int]:
    """The processes of process group `pgid` that still run, from /proc
    (zombies do not count: they are dead, waiting for a parent that may be
    an init that never reaps). Empty where there is no /proc."""
    members = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:  # gone meanwhile
                continue
            # "pid (comm) state ppid pgrp ...": comm may hold anything, even ")".
            fields = stat.rpartition(b")")[2].split()
            if len(fields) > 2 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


@dataclass(frozen=True)
class _Probe:
    port: int
    tls: bool
    greeting: bytes  # what a ready service says first


class Dovecot(ServerLog):
    """A Dovecot serving IMAP and submission from `folder`.

    The constructor writes the configuration; start() (or entering the
    context manager) runs Dovecot and the SMTP sink, stop() (or leaving it)
    stops both, with every process Dovecot started.
    """

    log_name = "dovecot"
    log_error = DovecotError

    host = "127.0.0.1"
    hostname = "backend.example.test"
    master_user = "proxy-master"
    master_password = "master-secret"

    def __init__(self, folder: Path, dovecot_bin: str | None = None,
                 doveadm_bin: str | None = None, oauth2: dict[str, str] | None = None):
        self.folder = Path(folder).resolve()
        self.oauth2 = oauth2
        self.oauth2_conf = self.folder / "dovecot-oauth2.conf.ext"
        self.oauth2_keys = self.folder / "oauth2-keys"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dovecot_bin = dovecot_bin or _find_tool("dovecot")
        self.doveadm_bin = doveadm_bin or _find_tool("doveadm")
        self.conf_path = self.folder / "dovecot.conf"
        self.log_path = self.folder / "dovecot.log"
        self.base_dir = self.folder / "run"
        self.state_dir = self.folder / "state"
        self.mail_root = self.folder / "mail"
        self.users_file = self.folder / "users.passwd"
        self.master_users_file = self.folder / "master-users.passwd"
        if len(str(self.base_dir).encode()) > _MAX_BASE_DIR:
            raise DovecotError(f"{self.base_dir} is too long for unix sockets in it: "
                               f"use a folder with a path of at most "
                               f"{_MAX_BASE_DIR - len('/run')} bytes")
        self.pki = make_pki(self.folder / "pki")
        self.ca_file = self.pki.ca_file
        (self.internal_user, self.internal_group, self.login_user,
         self.mail_user, self.mail_uid, self.mail_gid) = _identity()
        self._chroot = os.geteuid() == 0
        for path in (self.base_dir, self.state_dir, self.mail_root):
            path.mkdir(exist_ok=True)
        # The mail processes, as the mail user, create users/<user>/Maildir
        # and temporary files in tmp/.
        for path in (self.mail_root, self.mail_root / "users", self.mail_root / "tmp"):
            path.mkdir(exist_ok=True)
            os.chown(path, self.mail_uid, self.mail_gid)
            os.chmod(path, 0o700)
        self._users: dict[str, str] = {}
        _write_private(self.users_file, "")
        _write_private(self.master_users_file,
                       _passwd_line(self.master_user, self.master_password))
        self.imap_port = free_port()
        self.imaps_port = free_port()
        self.pop3_port = free_port()
        self.pop3s_port = free_port()
        self.submission_port = free_port()
        self.sink = SmtpSink(self.host, hostname="sink.example.test")
        self._process: subprocess.Popen | None = None
        self._has_run = False  # once Dovecot ran, its ports are kept for good
        self._log_offset = 0  # size of the log when Dovecot was last started
        self._write_config()

    # -- addresses and credentials ---------------------------------------------------

    @property
    def sink_port(self) -> int:
        return self.sink.port

    def master_login(self, user: str) -> str:
        """The LOGIN user name that logs the master user in as `user`."""
        return f"{user}*{self.master_user}"

    def master_plain(self, user: str) -> bytes:
        """The SASL PLAIN message (RFC 4616) that logs the master user in as
        `user`: authorization identity `user`, authentication identity the
        master user."""
        return f"{user}\0{self.master_user}\0{self.master_password}".encode()

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the test CA (and nothing else)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    # -- configuration ----------------------------------------------------------------

    def _write_config(self) -> None:
        cpus = os.cpu_count() or 2
        if self._chroot:
            mail = f"""\
# The mail processes (imap, submission, doveadm save) start as root,
# chroot into the mail folder, then become {self.mail_user}: they never walk
# the folders above it, which only root may enter. There are no home
# directories: with a chroot, Dovecot logs an error for each user whose home
# does not exist yet, and nothing here needs one. Temporary files (a large
# message being received) go to tmp/ in the chroot, which has no /tmp.
mail_chroot = {self.mail_root}
valid_chroot_dirs = {self.mail_root}
mail_location = maildir:/users/%u/Maildir
mail_temp_dir = /tmp"""
        else:
            mail = f"""\
# Not root: no chroot; the mail processes are {self.mail_user}, like all
# of Dovecot.
mail_location = maildir:{self.mail_root}/users/%u/Maildir
mail_temp_dir = {self.mail_root}/tmp"""
        # Without root, Dovecot can neither chroot a process (as it does
        # with the login processes, anvil, ...) nor run one as root.
        no_chroot = "" if self._chroot else "  chroot =\n"
        auth_user = "root" if self._chroot else "$default_internal_user"
        other_chroots = "" if self._chroot else "".join(
            f"service {name} {{\n  chroot =\n}}\n"
            for name in ("aggregator", "director", "imap-urlauth-login", "ipc", "old-stats")
        )

        def listener(name: str, port: int, tls: bool = False) -> str:
            return (f"  inet_listener {name} {{\n    address = {self.host}\n"
                    f"    port = {port}\n    ssl = {'yes' if tls else 'no'}\n  }}\n")

        if self.oauth2 is None:
            authentication = """\
auth_mechanisms = plain login
# "user*master" as a login name logs the master user in as user; SASL PLAIN
# does the same with authorization identity user and authentication identity
# master, with no separator involved.
auth_master_user_separator = *"""
            passdbs = f"""\
# The master user may log in as anybody. Without pass = yes the user itself
# need not be in any passdb: the static userdb below takes every name.
passdb {{
  driver = passwd-file
  args = {self.master_users_file}
  master = yes
}}
# Users with a password of their own (add_user), for direct logins.
passdb {{
  driver = passwd-file
  args = {self.users_file}
}}"""
        else:
            _write_private(self.oauth2_conf, "".join(f"{k} = {v}\n" for k, v in self.oauth2.items()))
            authentication = "# Nothing but OAuth.\nauth_mechanisms = xoauth2 oauthbearer"
            passdbs = f"""\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {self.oauth2_conf}
}}"""
        # Login processes in "high-performance mode" (service_count = 0):
        # each serves many connections instead of one process per connection,
        # and a few wait ready. Dovecot's default (service_count = 1) forks a
        # login process for every connection.
        login_tuning = f"""\
  service_count = 0
  process_min_avail = {cpus}
  client_limit = 1000
  vsz_limit = 1G
{no_chroot}"""
        self.conf_path.write_text(f"""\
# Generated by tests/dovecot.py for one test session. Standalone: nothing is
# read from /etc/dovecot.

protocols = imap pop3 submission
listen = {self.host}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
instance_name = dovecot-tests
hostname = {self.hostname}
postmaster_address = postmaster@example.test
login_greeting = Dovecot test backend ready.

log_path = {self.log_path}
log_timestamp = "%Y-%m-%d %H:%M:%S "
# The login line shows the client address Dovecot believes in (rip: the
# x-originating-ip of a trusted proxy's ID command, if any) and the address
# the connection really came from (real_rip).
login_log_format_elements = user=<%u> method=%m rip=%r lip=%l real_rip=%{{real_rip}} mpid=%e %c session=<%{{session}}>
# Log the IMAP ID a client sends, so tests can see what the proxy forwarded.
imap_id_log = *
# Log failed logins with their reason.
auth_verbose = yes
verbose_proctitle = yes
# No statistics: without this every process connects to the stats service
# when it starts, and one that starts while Dovecot stops waits 5 s for an
# answer that never comes, holding up stop().
stats_writer_socket_path =

default_internal_user = {self.internal_user}
default_internal_group = {self.internal_group}
default_login_user = {self.login_user}
mail_uid = {self.mail_uid}
mail_gid = {self.mail_gid}
first_valid_uid = {self.mail_uid}
last_valid_uid = {self.mail_uid}
first_valid_gid = {self.mail_gid}
last_valid_gid = {self.mail_gid}

{mail}
namespace inbox {{
  inbox = yes
}}
# Stored as CRLF, as sent over IMAP and SMTP: a message saved with CRLF line
# ends is kept byte for byte (the default converts it to LF).
mail_save_crlf = yes
# Test mail is thrown away: never wait for the disk.
mail_fsync = never
# Benchmarks open many sessions of one user from one address (the proxy's,
# or the one it forwards); the default is 10.
mail_max_userip_connections = 10000

ssl = yes
ssl_cert = <{self.pki.cert_file}
ssl_key = <{self.pki.key_file}
ssl_min_protocol = TLSv1.2
# The proxy logs in with a password on loopback, without TLS.
disable_plaintext_auth = no
# 127.0.0.0/8 is the proxy's: its connections count as secured, and the
# client address it passes (IMAP ID x-originating-ip and friends) is
# believed and logged as rip.
login_trusted_networks = 127.0.0.0/8

{authentication}
# Failed logins answer at once: the default 2 s delay only slows tests down.
auth_failure_delay = 0
# No auth cache: passwd-files are in-memory hash tables, reread when they
# change, and {{PLAIN}} costs nothing to check; a cache would only keep old
# passwords alive after add_user().
auth_cache_size = 0

{passdbs}
# Every name is a mailbox owner.
userdb {{
  driver = static
  args = allow_all_users=yes
}}

submission_relay_host = {self.host}
submission_relay_port = {self.sink.port or 1}
submission_relay_ssl = no
submission_max_mail_size = 100M

service imap-login {{
{listener("imap", self.imap_port)}{listener("imaps", self.imaps_port, tls=True)}{login_tuning}}}
service pop3-login {{
{listener("pop3", self.pop3_port)}{listener("pop3s", self.pop3s_port, tls=True)}{login_tuning}}}
service submission-login {{
{listener("submission", self.submission_port)}{login_tuning}}}
# One imap (submission) process per session, as usual; a few wait ready so
# that a login does not wait for a fork and exec. Up to 1000 sessions.
service imap {{
  process_limit = 1000
  process_min_avail = {cpus}
}}
service submission {{
  process_limit = 1000
  process_min_avail = {cpus}
}}
service pop3 {{
  process_limit = 1000
}}
# Messages are kept as stored (CRLF): POP3 sizes and UIDLs as Dovecot's own.
pop3_uidl_format = %08Xu%08Xv
# The auth process reads the passwd-files in the test folder.
service auth {{
  user = {auth_user}
  client_limit = 10000
}}
# No auth penalty: anvil makes every login from an address that failed to
# log in wait, up to 15 s, which would turn a test of a wrong password into
# minutes of waiting (and the proxy's address, or the one it forwards, is
# the same for every test). The auth process finds no socket under the name
# it knows and goes without.
service anvil {{
  unix_listener anvil-auth-penalty {{
    path = anvil-auth-penalty-disabled
  }}
{no_chroot}}}
{other_chroots}""")

    # -- OAuth ------------------------------------------------------------------------

    def oauth2_settings(self, *, issuer: str, client_id: str) -> dict[str, str]:
        """The oauth2 passdb's settings for the proxy's app registration:
        JWT access tokens validated here with the keys of set_validation_keys
        (signature, exp, nbf, the issuer), and accepted for any mailbox if
        the token's client_id is ``client_id``: username_format is a
        constant, so the user Dovecot is asked for and the token's
        username_attribute (client_id, required) expand to the same text."""
        return {
            "introspection_mode": "local",
            "local_validation_key_dict": f"fs:posix:prefix={self.oauth2_keys}/",
            "issuers": issuer,
            **self._app_registration(client_id),
        }

    def oauth2_introspection_settings(self, *, url: str, client_id: str, own_client: str,
                                      own_secret: str, ca_file: Path) -> dict[str, str]:
        """The same, but each token asked about at the provider's
        introspection endpoint (RFC 7662, POST), as Dovecot's own client
        ``own_client``: a token the provider no longer vouches for is
        refused at once, whatever its expiry says."""
        parts = url.split("://", 1)
        return {
            "introspection_mode": "post",
            "introspection_url": f"{parts[0]}://{own_client}:{own_secret}@{parts[1]}",
            "tls_ca_cert_file": str(ca_file),
            **self._app_registration(client_id),
        }

    @staticmethod
    def _app_registration(client_id: str) -> dict[str, str]:
        return {
            "username_attribute": "client_id",
            "username_format": "app-registration",
            "active_attribute": "client_id",
            "active_value": client_id,
            "debug": "yes",
        }

    def trust_provider(self, jwks: dict, sample_token: str) -> None:
        """Take the provider's RSA keys (its JWKS document) for tokens like
        ``sample_token`` (one of the app registration's): each key written
        as PEM for the token's azp and for default, under its kid and
        default, as Dovecot looks them up."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

        def b64url(text: str) -> bytes:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

        header_part, claims_part, _ = sample_token.split(".")
        header, claims = json.loads(b64url(header_part)), json.loads(b64url(claims_part))
        keys = {}
        for jwk in jwks["keys"]:
            if jwk.get("kty") != "RSA":
                continue
            numbers = RSAPublicNumbers(int.from_bytes(b64url(jwk["e"]), "big"),
                                       int.from_bytes(b64url(jwk["n"]), "big"))
            pem = numbers.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            for azp in {claims.get("azp", "default"), "default"}:
                for kid in {jwk.get("kid", "default"), header.get("kid", "default"), "default"}:
                    keys[(azp, "RS256", kid)] = pem
        self.set_validation_keys(keys)

    def set_validation_keys(self, keys: dict[tuple[str, str, str], str]) -> None:
        """The provider's public keys (PEM), by (azp, alg, kid) as Dovecot
        looks them up: shared/<azp or default>/<alg>/<kid or default>, which
        the fs dict keeps as <azp>/<alg>/<kid> under its prefix."""
        for (azp, alg, kid), pem in keys.items():
            path = self.oauth2_keys / azp / alg / kid
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(pem)
        for folder in [self.oauth2_keys, *self.oauth2_keys.rglob("*")]:
            os.chmod(folder, 0o755 if folder.is_dir() else 0o644)

    # -- users and mail -----------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Give `name` a password for direct logins (or change it). Dovecot
        rereads the file on its next lookup."""
        name = dovecot_username(name)
        if name == self.master_user:
            raise ValueError(f"{name} is the master user")
        self._users[name] = password
        _write_private(self.users_file,
                       "".join(_passwd_line(n, p) for n, p in self._users.items()))

    def remove_user(self, name: str) -> None:
        """Take the password of `name` away (the mailbox stays)."""
        self._users.pop(dovecot_username(name), None)
        _write_private(self.users_file,
                       "".join(_passwd_line(n, p) for n, p in self._users.items()))

    def maildir(self, user: str) -> Path:
        """The Maildir of `user`, once they logged in or got mail."""
        return self.mail_root / "users" / dovecot_username(user) / "Maildir"

    def deliver(self, user: str, message: bytes, mailbox: str = "INBOX") -> None:
        """Store `message` in a mailbox of `user` with doveadm save. No
        header is added and CRLF line ends are kept, so a CRLF message is
        stored byte for byte; a bare LF is stored as CRLF (mail_save_crlf)."""
        self._doveadm("save", "-u", dovecot_username(user), "-m", mailbox, input=message)

    def fetch_stored(self, user: str) -> list[bytes]:
        """The messages in the INBOX of `user` as stored in the Maildir files,
        in UID order (then by file name for files Dovecot has not seen yet)."""
        for attempt in range(5):
            try:
                return self._read_maildir(self.maildir(user))
            except FileNotFoundError:
                # A session moved a file from new/ to cur/ (or renamed it
                # for new flags) between listing and reading: list again.
                if attempt == 4:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    @staticmethod
    def _read_maildir(maildir: Path) -> list[bytes]:
        files = {}
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(maildir / sub):
                    if entry.is_file():
                        files[entry.name.split(":", 1)[0]] = Path(entry.path)
        uids = {}
        with contextlib.suppress(FileNotFoundError):
            # dovecot-uidlist: a header line, then "<uid> [fields] :<base name>".
            for line in (maildir / "dovecot-uidlist").read_text(errors="replace").splitlines()[1:]:
                uid, _, rest = line.partition(" ")
                _, colon, base = rest.partition(":")  # the fields hold no ':'
                if uid.isdigit() and colon and base:
                    uids[base] = int(uid)
        order = sorted(files, key=lambda base: (base not in uids, uids.get(base, 0), base))
        return [files[base].read_bytes() for base in order]

    def _doveadm(self, *args: str, input: bytes | None = None) -> str:
        result = subprocess.run(
            [self.doveadm_bin, "-c", str(self.conf_path), *args],
            input=input, capture_output=True, timeout=CLIENT_TIMEOUT,
        )
        if result.returncode != 0:
            raise DovecotError(
                f"doveadm {' '.join(args)} failed with status {result.returncode}:\n"
                f"{result.stdout.decode(errors='replace')}"
                f"{result.stderr.decode(errors='replace')}\n{self._tail()}"
            )
        return result.stdout.decode(errors="replace")

    # -- the sink -------------------------------------------------------------------------

    def sink_messages(self) -> list[SinkMessage]:
        """Every message relayed to the sink so far, oldest first."""
        return self.sink.messages()

    def wait_for_messages(self, count: int, timeout: float = 10.0,
                          since: int = 0) -> list[SinkMessage]:
        """sink_messages()[since:] (`since` being len(sink_messages()) before
        the test sent anything) once it holds at least `count` messages."""
        messages = self.sink.wait_for(count, timeout, since)
        if messages is None:
            got = len(self.sink.messages()) - since
            raise DovecotError(f"the sink got {got} of {count} messages within "
                               f"{timeout:.0f} s\n{self._tail()}")
        return messages

    # -- process ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The master process while Dovecot runs: also the id of the process
        group of all its processes (see process_group_members)."""
        return self._process.pid if self.running else None

    def start(self) -> None:
        """Run the sink and Dovecot, and wait until every port answers.
        After the first successful start the ports are fixed: clients keep
        using the same ones."""
        if self.running:
            return
        self.sink.start()
        attempts = 1 if self._has_run else 3
        for attempt in range(attempts):
            try:
                self._write_config()
                self._start_once()
            except DovecotError:
                # Only a lost race for the ports is worth another try.
                in_use = "Address already in use" in self._log_since(self._log_offset)
                if attempt + 1 == attempts or not in_use:
                    self.sink.stop()
                    raise
                self.imap_port, self.imaps_port = free_port(), free_port()
                self.pop3_port, self.pop3s_port = free_port(), free_port()
                self.submission_port = free_port()
            else:
                self._has_run = True
                return

    def _command(self) -> list[str]:
        command = [self.dovecot_bin, "-F", "-c", str(self.conf_path)]
        # The kernel sends SIGTERM to Dovecot should this process die without
        # stopping it (SIGKILL, a crash): no Dovecot outlives its tests.
        # Dovecot's children follow their master on their own.
        setpriv = shutil.which("setpriv")
        if setpriv:
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        return command

    def _start_once(self) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            # Dovecot's log process writes log_path; what goes to stdout and
            # stderr before it runs (a configuration error) lands there too.
            # A session of its own: stop() can then find every process
            # Dovecot started, by process group.
            self._process = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        _running.add(self)
        probes = [
            _Probe(self.imap_port, False, b"* OK"),
            _Probe(self.imaps_port, True, b"* OK"),
            _Probe(self.pop3_port, False, b"+OK"),
            _Probe(self.pop3s_port, True, b"+OK"),
            _Probe(self.submission_port, False, b"220 "),
        ]
        deadline = time.monotonic() + START_TIMEOUT
        while probes:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._reap()
                raise DovecotError(f"dovecot exited with status {code} while starting\n"
                                   f"{self._tail()}")
            if self._answers(probes[0]):
                probes.pop(0)
                continue
            if time.monotonic() > deadline:
                self._kill()
                raise DovecotError(f"dovecot did not answer on {self.host}:{probes[0].port} "
                                   f"within {START_TIMEOUT:.0f} s\n{self._tail()}")
            time.sleep(0.02)

    def _answers(self, probe: _Probe) -> bool:
        """Whether the service on `probe.port` greets (over TLS, verified
        against the test CA, for a TLS port): its login process is up, with
        its configuration."""
        try:
            with socket.create_connection((self.host, probe.port), timeout=2) as raw:
                if probe.tls:
                    with self.ssl_context().wrap_socket(raw, server_hostname=self.host) as s:
                        greeting = s.recv(256)
                else:
                    greeting = raw.recv(256)
        except (OSError, ssl.SSLError):  # not listening yet, reset, timed out
            return False
        return greeting.startswith(probe.greeting)

    def stop(self) -> None:
        """Stop Dovecot (SIGTERM: the master stops its children and waits for
        them), make sure none of its processes is left, and stop the sink."""
        try:
            if self._process is not None and self._process.poll() is None:
                self._process.send_signal(signal.SIGTERM)
                try:
                    self._process.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self._kill()
                    raise DovecotError(f"dovecot did not stop within {STOP_TIMEOUT:.0f} s\n"
                                       f"{self._tail()}") from None
            self._reap()
        finally:
            self.sink.stop()

    def _reap(self) -> None:
        """Kill whatever is left in Dovecot's process group (a child its
        master did not wait for), wait until it is gone, then forget the
        process."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        pgid = self._process.pid
        deadline = time.monotonic() + STOP_TIMEOUT
        # The group id stays reserved while any member lives, so this only
        # reaches Dovecot's own processes.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        while left := process_group_members(pgid):
            if time.monotonic() > deadline:
                raise DovecotError(f"dovecot processes {left} survive SIGKILL\n{self._tail()}")
            time.sleep(0.02)
        self._process = None
        _running.discard(self)

    def _kill(self) -> None:
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._reap()

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

