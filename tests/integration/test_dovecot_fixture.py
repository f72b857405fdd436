"""The Dovecot fixture itself, checked with real clients (imaplib, smtplib,
swaks): what the proxy's tests rely on (direct and master-user logins over
every transport, the originating address of a trusted proxy, messages stored
and relayed byte for byte, restarts, the log) must hold before the proxy is
put in front of it."""

import base64
import imaplib
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.dovecot import Dovecot, DovecotError, process_group_members, split_trace

pytestmark = pytest.mark.integration

TIMEOUT = 30

# 8-bit text, CRLF line ends, lines that need dot-stuffing in SMTP, a line of
# dots, a header with 8-bit content: what must survive storage and relay.
MESSAGE = (
    b"From: Ren\xc3\xa9e <renee@example.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: caf\xc3\xa9 \xe2\x98\x95\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
    b".a line that starts with a dot\r\n"
    b"..\r\n"
    b".\r\n"
    b"  trailing spaces  \r\n"
    b"\r\n"
    b"last line\r\n"
)


def big_message(size: int = 10 * 1024 * 1024) -> bytes:
    """A message of at least `size` bytes: random base64 lines mixed with
    8-bit lines and lines starting with a dot, all ending in CRLF."""
    head = (b"From: big@example.test\r\nTo: bob@example.test\r\nSubject: big\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n")
    lines = []
    total = len(head)
    i = 0
    while total < size:
        if i % 10 == 0:
            line = b".dotted \xc3\xa9\xc3\xa8 " + str(i).encode() + b"\r\n"
        else:
            line = base64.b64encode(os.urandom(57)) + b"\r\n"
        lines.append(line)
        total += len(line)
        i += 1
    return head + b"".join(lines)


def imap(dovecot, port=None) -> imaplib.IMAP4:
    return imaplib.IMAP4(dovecot.host, port or dovecot.imap_port, timeout=TIMEOUT)


def fetch_all(client: imaplib.IMAP4) -> list[bytes]:
    """BODY[] of every message in the INBOX, in UID order."""
    typ, data = client.select("INBOX", readonly=True)
    assert typ == "OK", data
    if int(data[0]) == 0:
        return []
    typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
    assert typ == "OK", data
    return [item[1] for item in data if isinstance(item, tuple)]


def master_session(dovecot, user) -> imaplib.IMAP4:
    client = imap(dovecot)
    typ, _ = client.authenticate("PLAIN", lambda _: dovecot.master_plain(user))
    assert typ == "OK"
    return client


def submission(dovecot) -> smtplib.SMTP:
    client = smtplib.SMTP(dovecot.host, dovecot.submission_port, timeout=TIMEOUT)
    client.starttls(context=dovecot.ssl_context())
    client.ehlo()
    return client


def auth_plain_as(client: smtplib.SMTP, authzid: str, authcid: str, password: str):
    """AUTH PLAIN with an authorization identity, which smtplib's own
    auth_plain cannot send."""
    token = base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()
    return client.docmd("AUTH", "PLAIN " + token)


def log_mark(dovecot) -> int:
    return len(dovecot.log_text())


# -- IMAP logins ----------------------------------------------------------------


def test_user_logs_in_directly_with_a_password(dovecot, unique):
    user = unique("dv")
    dovecot.add_user(user, "pass:with:colons")
    since = log_mark(dovecot)
    with imap(dovecot) as client:
        typ, data = client.login(user, "pass:with:colons")
        assert typ == "OK", data
        assert fetch_all(client) == []
        client.logout()
    dovecot.wait_for_log(rf"Login: user=<{user}>, method=PLAIN", since=since)


def test_wrong_or_missing_password_is_refused(dovecot, unique):
    user = unique("dv")
    dovecot.add_user(user, "right")
    for name, password in ((user, "wrong"), (unique("dv"), "right")):
        with imap(dovecot) as client:
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                client.login(name, password)


def test_add_user_changes_a_password_at_once(dovecot, unique):
    user = unique("dv")
    dovecot.add_user(user, "first")
    dovecot.add_user(user, "second")
    with imap(dovecot) as client:
        with pytest.raises(imaplib.IMAP4.error):
            client.login(user, "first")
    with imap(dovecot) as client:
        assert client.login(user, "second")[0] == "OK"


def test_master_user_authenticates_with_plain_and_authzid(dovecot, unique):
    user = unique("dv")  # no password of its own: any name is a mailbox
    dovecot.deliver(user, MESSAGE)
    since = log_mark(dovecot)
    with master_session(dovecot, user) as client:
        # The session is the user's: it sees the user's INBOX.
        assert fetch_all(client) == [MESSAGE]
        client.logout()
    dovecot.wait_for_log(rf"Master user logging in as {user}\b", since=since)
    dovecot.wait_for_log(rf"imap-login: Info: Login: user=<{user}>", since=since)


def test_master_user_logs_in_with_the_separator_form(dovecot, unique):
    user = unique("dv")
    dovecot.deliver(user, MESSAGE)
    assert dovecot.master_login(user) == f"{user}*{dovecot.master_user}"
    with imap(dovecot) as client:
        typ, data = client.login(dovecot.master_login(user), dovecot.master_password)
        assert typ == "OK", data
        assert fetch_all(client) == [MESSAGE]


def test_master_user_with_a_wrong_password_is_refused(dovecot, unique):
    user = unique("dv")
    with imap(dovecot) as client:
        with pytest.raises(imaplib.IMAP4.error):
            client.authenticate(
                "PLAIN", lambda _: f"{user}\0{dovecot.master_user}\0wrong".encode())
    with imap(dovecot) as client:
        with pytest.raises(imaplib.IMAP4.error):
            client.login(dovecot.master_login(user), "wrong")


def test_user_names_are_case_insensitive(dovecot, unique):
    user = unique("Dv.Mixed")
    dovecot.deliver(user.upper(), MESSAGE)
    assert dovecot.maildir(user) == dovecot.mail_root / "users" / user.lower() / "Maildir"
    with master_session(dovecot, user) as client:
        assert fetch_all(client) == [MESSAGE]


def test_starttls_is_offered_and_verified_with_the_test_ca(dovecot, unique):
    user = unique("dv")
    dovecot.add_user(user, "secret")
    since = log_mark(dovecot)
    with imap(dovecot) as client:
        assert "STARTTLS" in client.capabilities
        typ, data = client.starttls(ssl_context=dovecot.ssl_context())
        assert typ == "OK", data
        assert client.login(user, "secret")[0] == "OK"
    dovecot.wait_for_log(rf"Login: user=<{user}>.*, TLS,", since=since)


def test_imaps(dovecot, unique):
    user = unique("dv")
    dovecot.deliver(user, MESSAGE)
    with imaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=dovecot.ssl_context(),
                           timeout=TIMEOUT) as client:
        typ, _ = client.authenticate("PLAIN", lambda _: dovecot.master_plain(user))
        assert typ == "OK"
        assert fetch_all(client) == [MESSAGE]


def test_imaps_certificate_is_checked(dovecot):
    context = ssl.create_default_context()  # the system CAs only
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=context,
                          timeout=TIMEOUT)


def test_originating_ip_from_a_trusted_proxy_is_used(dovecot, unique):
    user = unique("dv")
    since = log_mark(dovecot)
    with imap(dovecot) as client:
        # imaplib has no ID command; xatom sends it as is.
        typ, data = client.xatom(
            "ID", '("name" "legacy-auth-proxy" "x-originating-ip" "192.0.2.44" '
                  '"x-originating-port" "40123")')
        assert typ == "OK", data
        typ, _ = client.authenticate("PLAIN", lambda _: dovecot.master_plain(user))
        assert typ == "OK"
    dovecot.wait_for_log(r"ID sent: name=legacy-auth-proxy, x-originating-ip=192\.0\.2\.44",
                         since=since)
    login = dovecot.wait_for_log(rf"Login: user=<{user}>, method=PLAIN, [^\n]*", since=since)
    assert "rip=192.0.2.44," in login.group(0)
    assert "real_rip=127.0.0.1," in login.group(0)


def test_mail_processes_do_not_run_as_root(dovecot, unique):
    user = unique("dv")
    since = log_mark(dovecot)
    with master_session(dovecot, user) as client:
        mpid = int(dovecot.wait_for_log(rf"Login: user=<{user}>.* mpid=(\d+)",
                                        since=since).group(1))
        status = open(f"/proc/{mpid}/status").read()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
        assert uids and all(int(uid) == dovecot.mail_uid for uid in uids), status
        if os.geteuid() == 0:
            assert dovecot.mail_uid != 0
        client.logout()


# -- stored mail ----------------------------------------------------------------


def test_delivered_message_is_stored_and_fetched_byte_for_byte(dovecot, unique):
    user = unique("dv")
    second = MESSAGE.replace(b"Subject: caf", b"Subject: second caf")
    dovecot.deliver(user, MESSAGE)
    dovecot.deliver(user, second)
    assert dovecot.fetch_stored(user) == [MESSAGE, second]
    with master_session(dovecot, user) as client:
        assert fetch_all(client) == [MESSAGE, second]


def test_a_10_mb_message_is_stored_and_fetched_byte_for_byte(dovecot, unique):
    user = unique("dv")
    message = big_message()
    dovecot.deliver(user, message)
    assert dovecot.fetch_stored(user) == [message]
    with master_session(dovecot, user) as client:
        assert fetch_all(client) == [message]


def test_a_10_mb_message_appended_over_imap_is_stored_byte_for_byte(dovecot, unique):
    user = unique("dv")
    message = big_message()
    since = log_mark(dovecot)
    with master_session(dovecot, user) as client:
        typ, data = client.append("INBOX", None, None, message)
        assert typ == "OK", data
        assert fetch_all(client) == [message]
    assert dovecot.fetch_stored(user) == [message]
    assert not re.search(r"(Error|Warning|Fatal):", dovecot.log_text()[since:])


def test_fetch_stored_of_a_user_without_mail(dovecot, unique):
    assert dovecot.fetch_stored(unique("dv")) == []


# -- submission -----------------------------------------------------------------


def test_submission_as_master_user_relays_8bit_mail_byte_for_byte(dovecot, unique):
    user = unique("dv")
    since = len(dovecot.sink_messages())
    with submission(dovecot) as client:
        assert client.has_extn("8bitmime")
        code, reply = auth_plain_as(client, user, dovecot.master_user, dovecot.master_password)
        assert code == 235, reply
        client.sendmail(f"{user}@example.test", ["bob@example.test", "carol@example.test"],
                        MESSAGE, mail_options=["BODY=8BITMIME"])
    [message] = dovecot.wait_for_messages(1, since=since)
    assert message.mail_from == f"{user}@example.test"
    assert message.rcpt_to == ["bob@example.test", "carol@example.test"]
    assert "BODY=8BITMIME" in message.mail_options
    assert message.submitted == MESSAGE
    # All Dovecot adds is its Received: header, naming the user's session.
    assert message.data == message.trace + MESSAGE
    assert message.trace.startswith(b"Received: from ")
    assert b"by backend.example.test with ESMTPSA" in message.trace


def test_submission_relays_a_10_mb_message_byte_for_byte(dovecot, unique):
    user = unique("dv")
    big = big_message()
    since = len(dovecot.sink_messages())
    log_since = log_mark(dovecot)
    with submission(dovecot) as client:
        code, reply = auth_plain_as(client, user, dovecot.master_user, dovecot.master_password)
        assert code == 235, reply
        client.sendmail(f"{user}@example.test", ["bob@example.test"], big,
                        mail_options=["BODY=8BITMIME"])
    [message] = dovecot.wait_for_messages(1, since=since, timeout=TIMEOUT)
    assert message.submitted == big
    # Dovecot keeps the message in a temporary file meanwhile, which must work
    # in the mail processes' chroot as well.
    assert not re.search(r"(Error|Warning|Fatal):", dovecot.log_text()[log_since:])


def test_submission_direct_login_and_separator_form(dovecot, unique):
    user = unique("dv")
    dovecot.add_user(user, "secret")
    since = len(dovecot.sink_messages())
    for login, password in ((user, "secret"), (dovecot.master_login(user),
                                               dovecot.master_password)):
        with submission(dovecot) as client:
            client.login(login, password)
            client.sendmail(f"{user}@example.test", ["bob@example.test"], MESSAGE,
                            mail_options=["BODY=8BITMIME"])
    messages = dovecot.wait_for_messages(2, since=since)
    assert [m.submitted for m in messages] == [MESSAGE, MESSAGE]


def test_submission_refuses_a_wrong_password(dovecot, unique):
    user = unique("dv")
    with submission(dovecot) as client:
        code, _ = auth_plain_as(client, user, dovecot.master_user, "wrong")
        assert code == 535


def test_swaks_sends_through_submission(dovecot, unique, tmp_path):
    swaks = require_tool("swaks")
    user = unique("dv")
    body = tmp_path / "message.eml"
    # swaks ends the data with CRLF "." CRLF whether or not it already ends
    # with a line break: without its last CRLF, the file arrives as MESSAGE.
    body.write_bytes(MESSAGE[:-2])
    since = len(dovecot.sink_messages())
    result = subprocess.run(
        [swaks, "--server", dovecot.host, "--port", str(dovecot.submission_port),
         "--tls", "--tls-verify", "--tls-ca-path", str(dovecot.ca_file),
         "--auth", "LOGIN", "--auth-user", dovecot.master_login(user),
         "--auth-password", dovecot.master_password,
         "--from", f"{user}@example.test", "--to", "bob@example.test",
         "--data", f"@{body}"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [message] = dovecot.wait_for_messages(1, since=since)
    assert message.mail_from == f"{user}@example.test"
    assert message.rcpt_to == ["bob@example.test"]
    assert message.submitted == MESSAGE


# -- the sink on its own ----------------------------------------------------------


def test_sink_unstuffs_dots_of_data(dovecot):
    since = len(dovecot.sink_messages())
    # smtplib never uses BDAT: this is the DATA path, which Dovecot (seeing
    # CHUNKING) does not take.
    with smtplib.SMTP(dovecot.host, dovecot.sink_port, timeout=TIMEOUT) as client:
        client.sendmail("a@example.test", ["b@example.test"], MESSAGE,
                        mail_options=["BODY=8BITMIME", f"SIZE={len(MESSAGE)}"])
        client.sendmail("", ["c@example.test"], b"no trailing newline")
    first, second = dovecot.wait_for_messages(2, since=since)
    assert (first.mail_from, first.rcpt_to, first.data, first.chunked) == (
        "a@example.test", ["b@example.test"], MESSAGE, False)
    assert first.trace == b"" and first.submitted == MESSAGE
    # smtplib ends the last line for the terminator: that CRLF is data.
    assert (second.mail_from, second.data) == ("", b"no trailing newline\r\n")


def test_sink_takes_10_mb_with_data(dovecot):
    big = big_message()
    since = len(dovecot.sink_messages())
    with smtplib.SMTP(dovecot.host, dovecot.sink_port, timeout=TIMEOUT) as client:
        client.sendmail("a@example.test", ["b@example.test"], big)
    [message] = dovecot.wait_for_messages(1, since=since, timeout=TIMEOUT)
    assert message.data == big and not message.chunked


def test_sink_takes_bdat_chunks(dovecot):
    since = len(dovecot.sink_messages())
    with socket.create_connection((dovecot.host, dovecot.sink_port), timeout=TIMEOUT) as s:
        f = s.makefile("rwb")

        def send(data):
            f.write(data)
            f.flush()

        def reply():
            lines = [f.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(f.readline())
            return lines

        assert reply()[0].startswith(b"220 ")
        send(b"EHLO client.example.test\r\n")
        assert b"CHUNKING\r\n" in [line[4:] for line in reply()]
        # Pipelined; the chunks are taken as they are: no dot-unstuffing, a
        # bare LF stays.
        send(b"MAIL FROM:<a@example.test> BODY=BINARYMIME\r\nRCPT TO:<b@example.test>\r\n"
             b"BDAT 5\r\n.\r\n\r\nBDAT 3 LAST\r\nx.\n")
        assert [reply()[0][:3] for _ in range(4)] == [b"250"] * 4
        send(b"QUIT\r\n")
        assert reply()[0][:3] == b"221"
    [message] = dovecot.wait_for_messages(1, since=since)
    assert message.chunked and message.data == b".\r\n\r\nx.\n"


def test_wait_for_messages_times_out_with_the_log(dovecot):
    count = len(dovecot.sink_messages())
    with pytest.raises(DovecotError, match="last lines of"):
        dovecot.wait_for_messages(1, timeout=0.2, since=count)


def test_split_trace():
    assert split_trace(b"Received: a\r\n\tb\r\n c\r\nX: y\r\n\r\n") == (
        b"Received: a\r\n\tb\r\n c\r\n", b"X: y\r\n\r\n")
    assert split_trace(b"X: y\r\n\r\n") == (b"", b"X: y\r\n\r\n")


# -- process --------------------------------------------------------------------


def test_stop_leaves_no_process_and_start_reuses_the_ports(tmp_path, unique):
    user = unique("dv")
    server = Dovecot(tmp_path / "dovecot", dovecot_bin=require_tool("dovecot"),
                     doveadm_bin=require_tool("doveadm"))
    with server:
        ports = (server.imap_port, server.imaps_port, server.submission_port, server.sink_port)
        pgid = server.pid
        server.deliver(user, MESSAGE)
        # An open session: its imap process must go as well.
        client = master_session(server, user)
        assert len(process_group_members(pgid)) > 3
        server.stop()
        assert not server.running
        assert process_group_members(pgid) == []
        with pytest.raises((OSError, imaplib.IMAP4.abort)):
            client.noop()
        server.start()
        assert (server.imap_port, server.imaps_port, server.submission_port,
                server.sink_port) == ports
        with master_session(server, user) as client:
            assert fetch_all(client) == [MESSAGE]
        since = len(server.sink_messages())
        with submission(server) as smtp:
            auth_plain_as(smtp, user, server.master_user, server.master_password)
            smtp.sendmail(f"{user}@example.test", ["bob@example.test"], MESSAGE)
        assert server.wait_for_messages(1, since=since)[0].submitted == MESSAGE
    assert not server.running
    assert "Dovecot v2" in server.log_text()


def test_a_start_failure_reports_the_log(tmp_path):
    class Broken(Dovecot):
        def _write_config(self):
            super()._write_config()
            with open(self.conf_path, "a") as f:
                f.write("no_such_setting = 1\n")

    server = Broken(tmp_path / "dovecot", dovecot_bin=require_tool("dovecot"),
                    doveadm_bin=require_tool("doveadm"))
    with pytest.raises(DovecotError, match=r"(?s)exited with status.*no_such_setting"):
        server.start()
    assert not server.running
    assert not server.sink.running


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["interrupted", "killed"])
def test_no_dovecot_outlives_the_python_process_that_started_it(tmp_path, sig):
    """SIGINT (^C): KeyboardInterrupt, then the atexit hook stops Dovecot.
    SIGKILL: nothing runs in Python; the kernel sends Dovecot SIGTERM
    (setpriv --pdeathsig)."""
    require_tool("dovecot")
    if sig == signal.SIGKILL and not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    script = (
        "import sys, time\n"
        "from tests.dovecot import Dovecot\n"
        "server = Dovecot(sys.argv[1])\n"
        "server.start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "dovecot")],
                             cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = child.stdout.readline()
        assert line.strip().isdigit(), child.stderr.read1().decode(errors="replace")
        pgid = int(line)
        assert process_group_members(pgid)
        child.send_signal(sig)
        child.wait(timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while process_group_members(pgid):
            assert time.monotonic() < deadline, process_group_members(pgid)
            time.sleep(0.05)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
