"""AfterAuth: what only the proxy may say to the submission backend never
gets there from a client, whatever the client pipelines."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.frontends.base import ToBackend, ToClient
from proxy.frontends.smtp import AfterAuth


def run(guard, client=b"", backend=b""):
    """(bytes to the backend, bytes to the client)."""
    out = []
    if client:
        out += guard.feed_client(client)
    if backend:
        out += guard.feed_backend(backend)
    to_backend = b"".join(e.data for e in out if isinstance(e, ToBackend))
    to_client = b"".join(e.data for e in out if isinstance(e, ToClient))
    return to_backend, to_client


def test_xclient_and_xforward_are_answered_by_the_proxy():
    guard = AfterAuth()
    assert run(guard, b"XCLIENT LOGIN=bob ADDR=1.2.3.4\r\n") == (
        b"", b"550 5.7.1 Error: XCLIENT is not allowed\r\n")
    assert run(guard, b"xforward addr=1.2.3.4\r\n") == (
        b"", b"550 5.7.1 Error: XFORWARD is not allowed\r\n")
    assert run(guard, b"NOOP\r\n") == (b"NOOP\r\n", b"")


def test_a_refusal_is_answered_in_its_turn_without_holding_the_pipeline():
    guard = AfterAuth()
    assert run(guard, b"MAIL FROM:<a@x>\r\nXCLIENT LOGIN=bob\r\nRCPT TO:<b@x>\r\n") == (
        b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n", b"")
    assert run(guard, backend=b"250 2.1.0 Ok\r\n") == (
        b"", b"250 2.1.0 Ok\r\n550 5.7.1 Error: XCLIENT is not allowed\r\n")
    assert run(guard, backend=b"250 2.1.5 Ok\r\n") == (b"", b"250 2.1.5 Ok\r\n")


def test_commands_inside_a_message_are_the_message():
    guard = AfterAuth()
    assert run(guard, b"DATA\r\n") == (b"DATA\r\n", b"")
    assert run(guard, backend=b"354 go ahead\r\n") == (b"", b"354 go ahead\r\n")
    body = b"Subject: x\r\n\r\nXCLIENT LOGIN=bob\r\n..dot\r\n.\r\n"
    assert run(guard, body) == (body, b"")
    assert run(guard, b"XCLIENT LOGIN=bob\r\n") == (b"", b"")  # waits for the message's reply
    assert run(guard, backend=b"250 2.0.0 Ok: queued\r\n") == (
        b"", b"250 2.0.0 Ok: queued\r\n550 5.7.1 Error: XCLIENT is not allowed\r\n")


def test_after_a_refused_data_the_next_lines_are_commands():
    """A client that pipelines past DATA: if the backend refuses DATA, what
    followed is commands, and XCLIENT among them is caught."""
    guard = AfterAuth()
    assert run(guard, b"DATA\r\nXCLIENT LOGIN=bob\r\n.\r\n") == (b"DATA\r\n", b"")
    to_backend, to_client = run(guard, backend=b"554 5.5.1 Error: no valid recipients\r\n")
    assert b"XCLIENT" not in to_backend
    assert to_client.startswith(b"554 5.5.1")


def test_a_message_end_split_across_reads():
    guard = AfterAuth()
    run(guard, b"DATA\r\n")
    run(guard, backend=b"354 go\r\n")
    for part in (b"hello\r", b"\n", b".", b"\r", b"\nXCLIENT LOGIN=bob\r\n"):
        to_backend, _ = run(guard, part)
        assert b"XCLIENT" not in to_backend


def accepted_transaction(guard):
    run(guard, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
    run(guard, backend=b"250 ok\r\n250 ok\r\n")


def test_bdat_chunks_are_data_whatever_they_hold():
    guard = AfterAuth(chunking=True)
    accepted_transaction(guard)
    chunk = b"XCLIENT LOGIN=bob\r\n"
    to_backend, _ = run(guard, b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert to_backend == b"BDAT %d LAST\r\n" % len(chunk) + chunk
    to_backend, to_client = run(guard, b"XCLIENT x\r\n")
    assert to_backend == b"" and to_client == b""  # in its turn, after BDAT's reply
    assert run(guard, backend=b"250 ok\r\n")[1].endswith(b"XCLIENT is not allowed\r\n")


@pytest.mark.parametrize("chunking,transaction,answer", [
    (False, True, b"502 5.5.1"),  # the backend does not offer CHUNKING
    (True, False, b"503 5.5.1"),  # no MAIL and RCPT accepted
])
def test_a_bdat_the_backend_would_refuse_is_answered_and_its_chunk_dropped(
        chunking, transaction, answer):
    """A backend that refuses a BDAT may read its chunk as commands: the
    proxy answers such a BDAT itself and drops the chunk."""
    guard = AfterAuth(chunking=chunking)
    if transaction:
        accepted_transaction(guard)
    chunk = b"XCLIENT LOGIN=bob\r\n"
    to_backend, to_client = run(guard, b"BDAT %d\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert to_backend == b"NOOP\r\n" and to_client.startswith(answer)


@pytest.mark.parametrize("line", [
    b"BDAT 19 FOO", b" BDAT 19", b"BDAT\t19", b"BDAT 19 LAST X", b"BDAT  19", b"BDAT 1234567890123456789",
])
def test_a_malformed_bdat_is_answered_by_the_proxy_and_what_follows_is_commands(line):
    guard = AfterAuth(chunking=True)
    accepted_transaction(guard)
    to_backend, to_client = run(guard, line + b"\r\nXCLIENT ADDR=1.2.3.4\r\n")
    assert b"XCLIENT" not in to_backend
    assert to_client.startswith((b"501 5.5.4", b"502 5.5.1"))


@pytest.mark.parametrize("ending", [b"\n.\n", b"\r\n.\n", b"\n.\r\n"])
def test_a_bare_lf_cannot_end_a_message_where_the_proxy_does_not_see_it(ending):
    """SMTP smuggling: a message end that some backends accept with a bare
    LF. Bare LFs are made CRLF, so the backend sees the end the proxy sees."""
    guard = AfterAuth()
    run(guard, b"DATA\r\n")
    run(guard, backend=b"354 go\r\n")
    to_backend, _ = run(guard, b"hi" + ending + b"XCLIENT LOGIN=bob\r\n")
    assert b"XCLIENT" not in to_backend
    assert b"\n" not in to_backend.replace(b"\r\n", b"")


def test_a_crlf_split_across_reads_stays_one():
    guard = AfterAuth()
    run(guard, b"DATA\r\n")
    run(guard, backend=b"354 go\r\n")
    assert run(guard, b"line\r")[0] == b"line\r"
    assert run(guard, b"\n.\r\n")[0] == b"\n.\r\n"


def test_a_long_line_is_refused_whole():
    guard = AfterAuth(max_line=4096)
    to_backend, to_client = run(guard, b"XCLIENT LOGIN=victim" + b" " * 70_000)
    assert to_backend == b"" and to_client == b"500 5.5.2 Error: line too long\r\n"
    assert run(guard, b" " * 1000 + b"\r\nNOOP\r\n") == (b"NOOP\r\n", b"")


@pytest.mark.parametrize("command,answer", [
    (b"STARTTLS", b"503 5.5.1 Error: STARTTLS is not available after AUTH"),
    (b"AUTH PLAIN AGFsaWNlAHB3", b"503 5.5.1 Error: already authenticated"),
    (b"ETRN example.test", b"502 5.5.1 Error: command not available"),
    (b"NOOP\rXCLIENT LOGIN=bob", b"500 5.5.2 Error: bad characters in command"),
])
def test_only_the_commands_a_client_may_say_reach_the_backend(command, answer):
    guard = AfterAuth()
    assert run(guard, command + b"\r\n") == (b"", answer + b"\r\n")


def test_a_reply_line_split_across_reads_is_counted_once():
    guard = AfterAuth()
    run(guard, b"HELP\r\nNOOP\r\nXCLIENT A\r\n")
    assert run(guard, backend=b"214-2.0.0 Th") == (b"", b"")
    _, to_client = run(guard, backend=b"is is help\r\n214 2.0.0 end\r\n")
    assert to_client == b"214-2.0.0 This is help\r\n214 2.0.0 end\r\n"
    _, to_client = run(guard, backend=b"250 2.0.0 Ok\r\n")
    assert to_client == b"250 2.0.0 Ok\r\n550 5.7.1 Error: XCLIENT is not allowed\r\n"


def test_ehlo_answers_leave_out_what_clients_may_not_use():
    guard = AfterAuth()
    run(guard, b"EHLO client\r\n")
    _, to_client = run(guard, backend=b"250-mail.test\r\n250-PIPELINING\r\n250-XCLIENT ADDR\r\n")
    assert to_client == b""  # an EHLO answer is passed on whole
    _, to_client = run(guard, backend=b"250-STARTTLS\r\n250-AUTH PLAIN\r\n250 XFORWARD NAME ADDR\r\n")
    assert to_client == b"250-mail.test\r\n250 PIPELINING\r\n"


def test_unsolicited_replies_pass_through():
    guard = AfterAuth()
    assert run(guard, backend=b"421 4.4.2 timeout\r\n") == (b"", b"421 4.4.2 timeout\r\n")


@settings(max_examples=300)
@given(st.lists(st.sampled_from([
    b"MAIL FROM:<a@x>\r\n", b"RCPT TO:<b@x>\r\n", b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n",
    b"XCLIENT LOGIN=bob\r\n", b"XFORWARD ADDR=1.2.3.4\r\n", b"BDAT 19\r\n", b"body line\r\n",
    b".\r\n", b"EHLO x\r\n"]), max_size=30),
    st.lists(st.booleans(), max_size=30), st.integers(1, 7))
def test_no_pipelining_gets_a_proxy_only_command_to_a_strict_backend(lines, accepts, cut):
    """A model backend that answers each command in turn (DATA with 354 or
    554 as drawn) must never read a proxy-only command in command state."""
    guard = AfterAuth(chunking=True)
    stream = b"".join(lines)
    sent = bytearray()
    for i in range(0, len(stream), cut):
        to_backend, _ = run(guard, stream[i:i + cut])
        sent += to_backend
    # The backend, reading commands as a server does.
    answers = iter(accepts)
    state, chunk = "command", 0
    position = 0
    while True:
        if state == "bdat":
            position += chunk
            state = "command"
            continue
        end = sent.find(b"\r\n", position)
        if end < 0:
            break
        line = bytes(sent[position:end])
        position = end + 2
        if state == "data":
            if line == b".":
                state = "command"
                to_backend, _ = run(guard, backend=b"250 ok\r\n")
                sent += to_backend
            continue
        verb = line.split(b" ")[0].upper()
        assert verb not in (b"XCLIENT", b"XFORWARD", b"STARTTLS", b"AUTH")
        if verb == b"DATA":
            ok = next(answers, True)
            state = "data" if ok else "command"
            to_backend, _ = run(guard, backend=b"354 go\r\n" if ok else b"554 no\r\n")
        elif verb == b"BDAT":
            state, chunk = "bdat", int(line.split()[1])
            to_backend, _ = run(guard, backend=b"250 ok\r\n")
        elif verb == b"EHLO":
            to_backend, _ = run(guard, backend=b"250-x\r\n250 XCLIENT\r\n")
        else:
            to_backend, _ = run(guard, backend=b"250 ok\r\n")
        sent += to_backend
