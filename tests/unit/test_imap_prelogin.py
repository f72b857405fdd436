"""The IMAP pre-login state machine: bytes in, events out."""

import base64

from hypothesis import given, settings, strategies as st

from proxy.frontends.base import Close, Login, Send, StartTLS
from proxy.frontends.imap import PreLogin


def machine(tls=False, starttls=True, plaintext=False, **kw):
    return PreLogin(tls=tls, starttls=starttls, allow_plaintext=plaintext, **kw)


def sent(events):
    return b"".join(e.data for e in events if isinstance(e, Send))


def logins(events):
    return [e for e in events if isinstance(e, Login)]


def b64(data):
    return base64.b64encode(data)


def test_before_tls_login_is_disabled_and_starttls_offered():
    m = machine()
    assert b"STARTTLS" in m.greeting() and b"LOGINDISABLED" in m.greeting()
    assert b"AUTH=" not in m.greeting()
    # The core decides (and audits) that nothing is used in the clear; no
    # password is asked for where none is offered.
    events = m.feed(b"a LOGIN alice secret\r\nb AUTHENTICATE PLAIN\r\n")
    assert [login.tag for login in logins(events)] == [b"a"]
    events = m.login_failed(b"a", temporary=False, plaintext=True)
    assert sent(events) == b"a NO [PRIVACYREQUIRED] Use STARTTLS first.\r\n"
    (login,) = logins(events)
    assert (login.tag, login.username, login.secret) == (b"b", "", "")
    assert sent(m.login_failed(b"b", temporary=False, plaintext=True)) == (
        b"b NO [PRIVACYREQUIRED] Use STARTTLS first.\r\n")


def test_after_tls_auth_is_offered_and_starttls_is_not():
    m = machine(tls=True)
    caps = sent(m.feed(b"c CAPABILITY\r\n"))
    assert b"AUTH=PLAIN AUTH=LOGIN" in caps and b"STARTTLS" not in caps
    assert b"LOGINDISABLED" not in caps and b"SASL-IR" in caps


def test_commands_pipelined_after_starttls_are_never_executed():
    m = machine()
    events = m.feed(b"a STARTTLS\r\nb LOGIN alice secret\r\nc CAPABILITY\r\n")
    assert sent(events) == b"a OK Begin TLS negotiation now.\r\n"
    assert isinstance(events[-1], StartTLS)
    assert not logins(events)
    # Nothing from before TLS is remembered after it.
    assert m.feed(b"") == []
    events = m.feed(b"d LOGIN alice secret\r\n")
    assert [(e.tag, e.username, e.secret) for e in logins(events)] == [(b"d", "alice", "secret")]


def test_login_with_quoted_strings_and_literals():
    m = machine(tls=True)
    events = m.feed(b'a LOGIN "al\\"ice" {6}\r\n')
    assert sent(events) == b"+ Ready for literal data\r\n"
    events = m.feed(b"se cre\r\n")
    assert [(e.username, e.secret) for e in logins(events)] == [('al"ice', "se cre")]
    m = machine(tls=True)
    events = m.feed(b"a LOGIN {5+}\r\nalice {3+}\r\nx y\r\n")
    assert sent(events) == b""
    assert [(e.username, e.secret) for e in logins(events)] == [("alice", "x y")]


def test_large_literals_are_refused():
    m = machine(tls=True, max_literal=4096)
    events = m.feed(b"a LOGIN {5000}\r\n")
    assert sent(events) == b"a BAD literal of 5000 octets is too large\r\n"
    m = machine(tls=True, max_literal=4096)
    events = m.feed(b"a LOGIN {5000+}\r\n")
    assert sent(events).startswith(b"* BYE") and isinstance(events[-1], Close)


def test_long_lines_end_the_connection():
    m = machine(tls=True, max_line=100)
    events = m.feed(b"a NOOP" + b"x" * 200)
    assert sent(events).startswith(b"* BYE") and isinstance(events[-1], Close)


def test_authenticate_plain_with_and_without_initial_response():
    m = machine(tls=True)
    events = m.feed(b"a AUTHENTICATE PLAIN " + b64(b"\x00alice\x00secret") + b"\r\n")
    assert [(e.username, e.secret, e.mechanism) for e in logins(events)] == [
        ("alice", "secret", "plain")]
    m = machine(tls=True)
    assert sent(m.feed(b"a AUTHENTICATE PLAIN\r\n")) == b"+ \r\n"
    events = m.feed(b64(b"Alice\x00alice\x00secret") + b"\r\n")
    assert [(e.username, e.secret) for e in logins(events)] == [("alice", "secret")]


def test_plain_hands_the_authorization_identity_to_the_core():
    """Whether alice may act as admin is the core's to decide (and audit)."""
    m = machine(tls=True)
    events = m.feed(b"a AUTHENTICATE PLAIN " + b64(b"admin\x00alice\x00secret") + b"\r\n")
    (login,) = logins(events)
    assert (login.username, login.authzid) == ("alice", "admin")


def test_bad_base64_and_cancel_are_bad_commands_not_wrong_passwords():
    m = machine(tls=True)
    m.feed(b"a AUTHENTICATE PLAIN\r\n")
    assert sent(m.feed(b"!!!notbase64\r\n")) == b"a BAD Invalid base64 data.\r\n"
    m.feed(b"b AUTHENTICATE PLAIN\r\n")
    assert sent(m.feed(b"*\r\n")) == b"b BAD Authentication cancelled.\r\n"
    assert m.bad == 2


def test_authenticate_login():
    m = machine(tls=True)
    assert sent(m.feed(b"a AUTHENTICATE LOGIN\r\n")) == b"+ VXNlcm5hbWU6\r\n"
    assert sent(m.feed(b64(b"alice") + b"\r\n")) == b"+ UGFzc3dvcmQ6\r\n"
    events = m.feed(b64(b"secret") + b"\r\n")
    assert [(e.username, e.secret, e.mechanism) for e in logins(events)] == [
        ("alice", "secret", "login")]


def test_three_bad_commands_end_the_connection():
    m = machine(tls=True)
    events = m.feed(b"a SELECT INBOX\r\nb FETCH 1 BODY[]\r\nc XYZZY\r\nd NOOP\r\n")
    assert sent(events) == (b"a BAD Unknown command or not allowed before login.\r\n"
                            b"b BAD Unknown command or not allowed before login.\r\n"
                            b"c BAD Unknown command or not allowed before login.\r\n"
                            b"* BYE Too many invalid commands.\r\n")
    assert isinstance(events[-1], Close)


def test_noop_id_capability_logout():
    m = machine(tls=True)
    events = m.feed(b'a NOOP\r\nb ID ("name" "Outlook")\r\nc ID NIL\r\nd LOGOUT\r\n')
    text = sent(events)
    assert b"a OK NOOP completed.\r\n" in text
    assert text.count(b'* ID ("name" "legacy-auth-proxy")') == 2
    assert text.endswith(b"* BYE Logging out.\r\nd OK Logout completed.\r\n")
    assert isinstance(events[-1], Close)


def test_nothing_is_read_while_a_login_is_decided_and_the_rest_goes_on():
    m = machine(tls=True)
    events = m.feed(b"a LOGIN alice wrong\r\nb LOGIN alice right\r\nc SELECT INBOX\r\n")
    assert [e.tag for e in logins(events)] == [b"a"]
    events = m.login_failed(b"a", temporary=False)
    assert sent(events) == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert [e.tag for e in logins(events)] == [b"b"]
    assert m.take_rest() == b"c SELECT INBOX\r\n"


def test_temporary_failures_say_so():
    m = machine(tls=True)
    m.feed(b"a LOGIN alice x\r\n")
    assert sent(m.login_failed(b"a", temporary=True)).startswith(b"a NO [UNAVAILABLE]")


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=60), max_size=8))
def test_any_bytes_give_events_never_exceptions(chunks):
    m = machine(tls=True, max_line=200, max_literal=50)
    for chunk in chunks:
        events = m.feed(chunk)
        for event in events:
            assert isinstance(event, (Send, StartTLS, Login, Close))
            if isinstance(event, Login):
                m.login_failed(event.tag, temporary=False)
