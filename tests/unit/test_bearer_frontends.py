"""The mail front ends with access tokens, bytes in and events out: XOAUTH2
and OAUTHBEARER offered only where the core takes tokens, parsed into a
login the core decides, malformed ones answered as any bad SASL message."""

import base64

from proxy.frontends import imap, pop3, smtp
from proxy.frontends.base import Login, Send
from proxy.wire import oauth

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"


def sent(events):
    return b"".join(e.data for e in events if isinstance(e, Send))


def logins(events):
    return [e for e in events if isinstance(e, Login)]


def b64(data):
    return base64.b64encode(data)


def test_imap_offers_and_takes_tokens_only_where_the_core_does():
    without = imap.PreLogin(tls=True, starttls=False, allow_plaintext=False)
    assert b"AUTH=XOAUTH2" not in without.greeting()
    assert b"NO Unsupported" in sent(without.feed(b"a AUTHENTICATE XOAUTH2 =\r\n"))
    machine = imap.PreLogin(tls=True, starttls=False, allow_plaintext=False, bearer=True)
    assert b"AUTH=PLAIN AUTH=LOGIN AUTH=OAUTHBEARER AUTH=XOAUTH2" in machine.greeting()
    message = b64(oauth.encode("XOAUTH2", "alice", TOKEN))
    [login] = logins(machine.feed(b"a AUTHENTICATE XOAUTH2 " + message + b"\r\n"))
    assert (login.tag, login.username, login.secret, login.mechanism) == (b"a", "alice", TOKEN, "xoauth2")
    assert TOKEN not in repr(login)


def test_imap_oauthbearer_without_an_initial_response():
    machine = imap.PreLogin(tls=True, starttls=False, allow_plaintext=False, bearer=True)
    assert sent(machine.feed(b"b AUTHENTICATE OAUTHBEARER\r\n")) == b"+ \r\n"
    [login] = logins(machine.feed(b64(oauth.encode("OAUTHBEARER", "", TOKEN)) + b"\r\n"))
    assert (login.username, login.mechanism) == ("", "oauthbearer")


def test_a_malformed_message_is_a_bad_command():
    machine = imap.PreLogin(tls=True, starttls=False, allow_plaintext=False, bearer=True)
    events = machine.feed(b"c AUTHENTICATE XOAUTH2 " + b64(b"user=a\x01auth=Basic x\x01\x01") + b"\r\n")
    assert sent(events) == b"c BAD Invalid OAuth message.\r\n" and not logins(events)


def test_submission_and_pop3_offer_and_take_tokens():
    machine = smtp.PreAuth(tls=True, starttls=False, allow_plaintext=False, hostname="proxy.test",
                           bearer=True)
    assert b"250 AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2" in sent(machine.feed(b"EHLO c\r\n"))
    [login] = logins(machine.feed(b"AUTH XOAUTH2 " + b64(oauth.encode("XOAUTH2", "bob", TOKEN))
                                  + b"\r\n"))
    assert (login.username, login.mechanism) == ("bob", "xoauth2")
    machine = pop3.PreLogin(tls=True, starttls=False, allow_plaintext=False, bearer=True)
    assert b"SASL PLAIN LOGIN OAUTHBEARER XOAUTH2" in sent(machine.feed(b"CAPA\r\n"))
    [login] = logins(machine.feed(b"AUTH OAUTHBEARER " + b64(oauth.encode("OAUTHBEARER", "carol", TOKEN))
                                  + b"\r\n"))
    assert (login.username, login.mechanism) == ("carol", "oauthbearer")
    plain = pop3.PreLogin(tls=True, starttls=False, allow_plaintext=False)
    assert b"XOAUTH2" not in sent(plain.feed(b"CAPA\r\n"))
