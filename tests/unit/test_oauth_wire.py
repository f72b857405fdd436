"""OAUTHBEARER (RFC 7628) and XOAUTH2 messages, both sides."""

import pytest
from hypothesis import given, strategies as st

from proxy.wire import oauth

TOKENS = st.builds(lambda body, pad: body + "=" * pad,
                   st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~+/",
                           min_size=1, max_size=200), st.integers(0, 2))
USERS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\x01\r\n"),
                max_size=40)


def test_oauthbearer_as_rfc_7628_shows_it():
    # RFC 7628 4.1, with a port.
    message = oauth.encode("OAUTHBEARER", "user@example.com", "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
                           "server.example.com", 143)
    assert message == (b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
                       b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01")
    parsed = oauth.decode("OAUTHBEARER", message)
    assert (parsed.user, parsed.host, parsed.port) == ("user@example.com", "server.example.com", 143)
    assert parsed.token == "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="


def test_xoauth2_as_google_shows_it():
    message = oauth.encode("XOAUTH2", "someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg")
    assert message == (b"user=someuser@example.com\x01auth=Bearer "
                       b"ya29.vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg\x01\x01")
    assert oauth.decode("XOAUTH2", message).user == "someuser@example.com"


def test_commas_and_equals_in_the_name_are_escaped():
    message = oauth.encode("OAUTHBEARER", "a,b=c", "t")
    assert message.startswith(b"n,a=a=2Cb=3Dc,\x01")
    assert oauth.decode("OAUTHBEARER", message).user == "a,b=c"


@pytest.mark.parametrize("message", [
    b"", b"n,,", b"p=tls-unique,,\x01auth=Bearer t\x01\x01", b"n,a=x\x01auth=Bearer t\x01\x01",
    b"n,,\x01auth=Basic dTpw\x01\x01", b"n,,\x01auth=Bearer t\x01", b"n,a=a=2,\x01auth=Bearer t\x01\x01",
    b"n,,\x01auth=Bearer a\x01b\x01\x01", b"n,,\x01port=x\x01auth=Bearer t\x01\x01",
    b"n,,\x01auth=Bearer \x01\x01", b"n,,\x01auth=Bearer t t\x01\x01",
])
def test_malformed_oauthbearer_is_refused_without_quoting_the_token(message):
    with pytest.raises(oauth.Malformed) as e:
        oauth.decode("OAUTHBEARER", message)
    assert "Bearer" not in str(e.value) or "no auth=Bearer" == str(e.value)


def test_a_token_that_could_break_the_message_is_never_encoded():
    for token in ("", "a\x01b", "a b", "a\r\n", "x" * (oauth.MAX_TOKEN + 1), "=a", "a=b", "é"):
        with pytest.raises(oauth.Malformed):
            oauth.encode("XOAUTH2", "alice", token)
    with pytest.raises(oauth.Malformed):
        oauth.encode("OAUTHBEARER", "al\x01ice", "t")


def test_the_token_is_not_in_the_repr():
    assert "sekrit" not in repr(oauth.decode("XOAUTH2", b"user=a\x01auth=Bearer sekrit\x01\x01"))


def test_the_servers_refusal_and_its_status():
    challenge = oauth.error_challenge("invalid_token", "mail")
    assert oauth.error_status(challenge) == "invalid_token"
    assert oauth.error_status(b'{"status":"401","schemes":"Bearer"}') == "401"
    assert oauth.error_status(b"not json") == ""
    assert oauth.error_status(b'{"status":"a b\\u0000c"}') == "abc"


@given(st.sampled_from(oauth.MECHANISMS), USERS, TOKENS, st.integers(1, 65535))
def test_what_is_encoded_decodes_to_the_same(mechanism, user, token, port):
    parsed = oauth.decode(mechanism, oauth.encode(mechanism, user, token, "mail.example.test", port))
    assert (parsed.mechanism, parsed.user, parsed.token) == (mechanism, user, token)


@given(st.sampled_from(oauth.MECHANISMS), st.binary(max_size=300))
def test_any_bytes_decode_or_are_malformed(mechanism, data):
    try:
        parsed = oauth.decode(mechanism, data)
    except oauth.Malformed:
        return
    assert parsed.token and len(parsed.token) <= oauth.MAX_TOKEN
    assert "\x01" not in parsed.token and "\x01" not in parsed.user


def test_the_sasl_exchange_takes_both_bearer_mechanisms():
    import base64

    from proxy.wire import sasl

    exchange = sasl.Exchange("XOAUTH2")
    assert exchange.start() == sasl.Challenge(b"")  # SMTP's "334 ", IMAP's "+ "
    got = exchange.answer(base64.b64encode(oauth.encode("XOAUTH2", "alice", "a.b.c")))
    assert got == sasl.Credentials(b"alice", b"a.b.c", "xoauth2")
    got = sasl.Exchange("OAUTHBEARER").start(
        base64.b64encode(oauth.encode("OAUTHBEARER", "alice", "a.b.c", "mail.example.test", 993)))
    assert got == sasl.Credentials(b"alice", b"a.b.c", "oauthbearer")
    assert sasl.Exchange("OAUTHBEARER").start(base64.b64encode(b"n,,\x01auth=Basic x\x01\x01")) \
        == sasl.Failed("malformed", "Invalid OAuth message.")
    assert sasl.Exchange("XOAUTH2").answer(b"*").kind == "cancelled"
