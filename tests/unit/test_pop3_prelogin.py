"""The POP3 pre-login state machine: bytes in, events out."""

import base64

from hypothesis import given, strategies as st

from proxy.frontends.base import Close, Login, Send, StartTLS
from proxy.frontends.pop3 import PreLogin


def machine(tls=False, starttls=True, plaintext=False, **kw):
    return PreLogin(tls=tls, starttls=starttls, allow_plaintext=plaintext, **kw)


def sent(events):
    return b"".join(e.data for e in events if isinstance(e, Send))


def logins(events):
    return [e for e in events if isinstance(e, Login)]


def test_before_tls_no_credentials_are_taken_and_stls_is_offered():
    m = machine()
    assert m.greeting().startswith(b"+OK")
    capa = sent(m.feed(b"CAPA\r\n"))
    assert b"\r\nSTLS\r\n" in capa and b"USER" not in capa and b"SASL" not in capa
    assert capa.endswith(b"\r\n.\r\n")
    events = m.feed(b"USER alice\r\nPASS secret\r\n")
    (login,) = logins(events)  # no credentials: the core refuses and audits
    assert (login.username, login.secret) == ("", "")
    events = m.login_failed(b"", temporary=False, plaintext=True)
    assert sent(events).startswith(b"-ERR [AUTH] Plaintext authentication disallowed")


def test_commands_pipelined_after_stls_are_never_executed():
    m = machine()
    events = m.feed(b"STLS\r\nUSER alice\r\nPASS secret\r\n")
    assert sent(events) == b"+OK Begin TLS negotiation now.\r\n"
    assert isinstance(events[-1], StartTLS) and not logins(events)
    assert m.tls and not m.feed(b"")
    capa = sent(m.feed(b"CAPA\r\n"))
    assert b"STLS" not in capa and b"USER" in capa and b"SASL PLAIN LOGIN" in capa


def test_user_and_pass_with_spaces_in_the_password():
    m = machine(tls=True)
    assert sent(m.feed(b"USER alice\r\n")) == b"+OK Send your password.\r\n"
    (login,) = logins(m.feed(b"PASS abcd efgh ijkl mnop\r\n"))
    assert (login.username, login.secret, login.mechanism) == ("alice", "abcd efgh ijkl mnop", "user")


def test_pass_needs_user_right_before_it():
    m = machine(tls=True)
    assert sent(m.feed(b"PASS x\r\n")).startswith(b"-ERR")
    m.feed(b"USER alice\r\n")
    m.feed(b"CAPA\r\n")
    assert sent(m.feed(b"PASS x\r\n")).startswith(b"-ERR USER first")


def test_auth_plain_with_an_initial_response_and_login_by_challenges():
    m = machine(tls=True)
    (login,) = logins(m.feed(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0pw") + b"\r\n"))
    assert (login.username, login.secret, login.authzid) == ("alice", "pw", "")
    m.login_failed(b"", temporary=False)
    assert sent(m.feed(b"AUTH LOGIN\r\n")) == b"+ VXNlcm5hbWU6\r\n"
    assert sent(m.feed(base64.b64encode(b"alice") + b"\r\n")) == b"+ UGFzc3dvcmQ6\r\n"
    (login,) = logins(m.feed(base64.b64encode(b"pw") + b"\r\n"))
    assert login.username == "alice"


def test_auth_without_a_mechanism_lists_them():
    assert sent(machine(tls=True).feed(b"AUTH\r\n")) == b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"


def test_failures_carry_rfc_3206_codes_and_the_rest_goes_on():
    m = machine(tls=True)
    events = m.feed(b"USER alice\r\nPASS wrong\r\nUSER alice\r\nPASS right\r\n")
    assert len(logins(events)) == 1  # nothing more is read while it is decided
    events = m.login_failed(b"", temporary=False)
    assert sent(events) == b"-ERR [AUTH] Authentication failed.\r\n+OK Send your password.\r\n"
    assert logins(events)[0].secret == "right"
    assert sent(m.login_failed(b"", temporary=True)).startswith(b"-ERR [SYS/TEMP]")


def test_bad_commands_end_the_connection_and_quit_says_goodbye():
    m = machine(tls=True)
    events = m.feed(b"STAT\r\nLIST\r\nRETR 1\r\n")
    assert isinstance(events[-1], Close) and sent(events).endswith(b"-ERR Too many bad commands.\r\n")
    m = machine(tls=True)
    events = m.feed(b"QUIT\r\n")
    assert sent(events) == b"+OK Logging out.\r\n" and isinstance(events[-1], Close)


def test_long_lines_end_the_connection():
    m = machine(tls=True, max_line=512)
    events = m.feed(b"USER " + b"a" * 600)
    assert sent(events) == b"-ERR Line too long.\r\n" and isinstance(events[-1], Close)


@given(st.lists(st.binary(max_size=60), max_size=8), st.booleans())
def test_any_bytes_keep_the_buffer_bounded_and_nothing_follows_a_close(chunks, tls):
    """Whatever the client sends: while the dialogue is open, what is held
    never passes the longest line allowed; a Close is the last event there
    is, and nothing is read or answered after it."""
    m = machine(tls=tls, max_line=64)
    closed = False
    for chunk in chunks:
        events = m.feed(chunk)
        assert not (closed and events), f"events after a Close: {events}"
        for index, event in enumerate(events):
            if isinstance(event, Close):
                closed = True
                assert index == len(events) - 1, "a Close is the last event"
            if isinstance(event, Login):
                events_after = m.login_failed(b"", temporary=False)
                assert not closed
                if any(isinstance(e, Close) for e in events_after or []):
                    closed = True
        assert closed or m.buffered <= 64
