"""The SASL PLAIN and LOGIN exchange every mail front end shares."""

import base64

from hypothesis import given, strategies as st

from proxy.wire import sasl


def b64(data):
    return base64.b64encode(data)


def test_plain_without_and_with_an_initial_response():
    exchange = sasl.Exchange("PLAIN")
    assert exchange.start() == sasl.Challenge(b"")
    assert exchange.answer(b64(b"boss\0alice\0pw")) == sasl.Credentials(b"alice", b"pw", "plain", b"boss")
    assert sasl.Exchange("PLAIN").start(b64(b"\0alice\0pw")).authcid == b"alice"
    assert sasl.Exchange("PLAIN").start(b"=") == sasl.Failed("malformed", "Invalid PLAIN message.")


def test_login_asks_for_the_name_then_the_password():
    exchange = sasl.Exchange("LOGIN")
    assert exchange.start() == sasl.Challenge(b"VXNlcm5hbWU6")
    assert exchange.answer(b64(b"alice")) == sasl.Challenge(b"UGFzc3dvcmQ6")
    assert exchange.answer(b64(b"pw")) == sasl.Credentials(b"alice", b"pw", "login")


def test_cancel_and_bad_base64():
    assert sasl.Exchange("LOGIN").answer(b"*").kind == "cancelled"
    assert sasl.Exchange("PLAIN").answer(b"!!").kind == "base64"


def test_the_secret_is_not_in_the_repr():
    assert "hunter2" not in repr(sasl.Credentials(b"alice", b"hunter2", "plain"))


@given(st.sampled_from(sasl.MECHANISMS), st.lists(st.binary(max_size=40), max_size=4))
def test_any_answers_give_a_step_never_an_exception(mechanism, answers):
    exchange = sasl.Exchange(mechanism)
    exchange.start()
    for answer in answers:
        if not isinstance(exchange.answer(answer), sasl.Challenge):
            break
