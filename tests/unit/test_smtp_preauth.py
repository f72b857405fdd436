"""The SMTP submission pre-AUTH state machine: bytes in, events out."""

import base64

from hypothesis import given, settings, strategies as st

from proxy.wire.smtp import passed_extensions, xtext
from proxy.frontends.base import Close, Login, Send, StartTLS
from proxy.frontends.smtp import PreAuth


def machine(tls=False, starttls=True, plaintext=False, **kw):
    return PreAuth(hostname="mx.example.test", tls=tls, starttls=starttls,
                   allow_plaintext=plaintext, extensions=[b"SIZE 1000", b"8BITMIME"], **kw)


def sent(events):
    return b"".join(e.data for e in events if isinstance(e, Send))


def logins(events):
    return [e for e in events if isinstance(e, Login)]


def test_before_tls_auth_is_neither_offered_nor_accepted():
    m = machine()
    assert m.greeting() == b"220 mx.example.test ESMTP ready\r\n"
    ehlo = sent(m.feed(b"EHLO client\r\n"))
    assert b"250-STARTTLS" in ehlo or ehlo.endswith(b"250 STARTTLS\r\n")
    assert b"AUTH" not in ehlo
    events = m.feed(b"AUTH PLAIN " + base64.b64encode(b"\x00alice\x00secret") + b"\r\n")
    # Not offered: the core is asked with no credentials, refuses and audits.
    (login,) = logins(events)
    assert (login.username, login.secret) == ("", "")
    events = m.login_failed(b"", temporary=False, plaintext=True)
    assert sent(events) == b"530 5.7.0 Must issue a STARTTLS command first\r\n"


def test_mail_before_auth_is_refused():
    m = machine(tls=True)
    m.feed(b"EHLO client\r\n")
    assert sent(m.feed(b"MAIL FROM:<a@example.test>\r\n")) == b"530 5.7.0 Authentication required\r\n"


def test_starttls_discards_pipelined_plaintext_and_forgets_ehlo():
    m = machine()
    m.feed(b"EHLO client\r\n")
    events = m.feed(b"STARTTLS\r\nAUTH PLAIN " + base64.b64encode(b"\x00a\x00b") + b"\r\n")
    assert sent(events) == b"220 2.0.0 Ready to start TLS\r\n"
    assert isinstance(events[-1], StartTLS) and not logins(events)
    events = m.feed(b"AUTH PLAIN " + base64.b64encode(b"\x00a\x00b") + b"\r\n")
    assert sent(events) == b"503 5.5.1 Error: send EHLO first\r\n"
    ehlo = sent(m.feed(b"EHLO client\r\n"))
    assert b"AUTH PLAIN LOGIN" in ehlo and b"STARTTLS" not in ehlo
    assert b"SIZE 1000" in ehlo and b"ENHANCEDSTATUSCODES" in ehlo


def test_auth_plain_with_and_without_initial_response():
    m = machine(tls=True)
    m.feed(b"EHLO client\r\n")
    events = m.feed(b"AUTH PLAIN " + base64.b64encode(b"\x00alice\x00s3cret") + b"\r\n")
    assert [(e.username, e.secret) for e in logins(events)] == [("alice", "s3cret")]
    m = machine(tls=True)
    m.feed(b"EHLO client\r\n")
    assert sent(m.feed(b"AUTH PLAIN\r\n")) == b"334 \r\n"
    events = m.feed(base64.b64encode(b"alice\x00alice\x00s3cret") + b"\r\n")
    assert [(e.username, e.secret) for e in logins(events)] == [("alice", "s3cret")]


def test_auth_login():
    m = machine(tls=True)
    m.feed(b"EHLO client\r\n")
    assert sent(m.feed(b"AUTH LOGIN\r\n")) == b"334 VXNlcm5hbWU6\r\n"
    assert sent(m.feed(base64.b64encode(b"alice") + b"\r\n")) == b"334 UGFzc3dvcmQ6\r\n"
    events = m.feed(base64.b64encode(b"pw") + b"\r\n")
    assert [(e.username, e.secret, e.mechanism) for e in logins(events)] == [("alice", "pw", "login")]


def test_bad_base64_cancel_and_foreign_authzid():
    m = machine(tls=True)
    m.feed(b"EHLO client\r\n")
    m.feed(b"AUTH PLAIN\r\n")
    assert sent(m.feed(b"%%%\r\n")) == b"501 5.5.2 Cannot decode response\r\n"
    m.feed(b"AUTH LOGIN\r\n")
    assert sent(m.feed(b"*\r\n")) == b"501 5.0.0 Authentication cancelled\r\n"
    events = m.feed(b"AUTH PLAIN " + base64.b64encode(b"boss\x00alice\x00pw") + b"\r\n")
    (login,) = logins(events)  # the core decides whether alice may act as boss
    assert (login.username, login.authzid) == ("alice", "boss")
    m.login_failed(b"", temporary=False)
    assert sent(m.feed(b"AUTH CRAM-MD5\r\n")) == b"504 5.5.4 Unrecognized authentication type\r\n"


def test_failures_and_the_rest_of_the_pipeline():
    m = machine(tls=True)
    m.feed(b"EHLO client\r\n")
    wrong = base64.b64encode(b"\x00alice\x00wrong")
    right = base64.b64encode(b"\x00alice\x00right")
    events = m.feed(b"AUTH PLAIN " + wrong + b"\r\nAUTH PLAIN " + right + b"\r\nMAIL FROM:<a@x>\r\n")
    assert len(logins(events)) == 1
    events = m.login_failed(b"", temporary=False)
    assert sent(events) == b"535 5.7.8 Error: authentication failed\r\n"
    assert [e.secret for e in logins(events)] == ["right"]
    assert m.take_rest() == b"MAIL FROM:<a@x>\r\n"
    m = machine(tls=True)
    m.feed(b"EHLO client\r\nAUTH PLAIN " + wrong + b"\r\n")
    assert sent(m.login_failed(b"", temporary=True)).startswith(b"454 4.7.0")


def test_the_hard_error_limit():
    m = machine(tls=True, max_bad=20)
    events = m.feed(b"XYZZY\r\n" * 25)
    text = sent(events)
    assert text.count(b"500 5.5.2") == 20
    assert text.endswith(b"421 4.7.0 Error: too many errors\r\n")
    assert isinstance(events[-1], Close)


def test_noop_rset_help_quit_and_long_lines():
    m = machine(tls=True, max_line=100)
    text = sent(m.feed(b"NOOP\r\nRSET\r\nHELP\r\n"))
    assert text.startswith(b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n214 2.0.0")
    events = m.feed(b"QUIT\r\n")
    assert sent(events) == b"221 2.0.0 Bye\r\n" and isinstance(events[-1], Close)
    m = machine(tls=True, max_line=100)
    events = m.feed(b"EHLO " + b"x" * 200)
    assert sent(events).startswith(b"500 5.5.0") and isinstance(events[-1], Close)


def test_extensions_passed_from_the_backend():
    lines = [b"backend.example", b"PIPELINING", b"SIZE 50000000", b"AUTH PLAIN", b"STARTTLS",
             b"XCLIENT ADDR", b"8BITMIME", b"CHUNKING", b"ENHANCEDSTATUSCODES"]
    assert passed_extensions(lines) == [b"PIPELINING", b"SIZE 50000000", b"8BITMIME", b"CHUNKING"]


def test_xtext():
    assert xtext("alice@example.test") == b"alice@example.test"
    assert xtext("a+b=c d") == b"a+2Bb+3Dc+20d"
    assert xtext("jürgen") == b"j+C3+BCrgen"


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=60), max_size=8))
def test_any_bytes_give_events_never_exceptions(chunks):
    m = machine(tls=True, max_line=200)
    for chunk in chunks:
        for event in m.feed(chunk):
            assert isinstance(event, (Send, StartTLS, Login, Close))
            if isinstance(event, Login):
                m.login_failed(b"", temporary=False)
