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


ANSWERS = st.one_of(st.binary(max_size=40), st.binary(max_size=40).map(b64), st.just(b"*"),
                    st.lists(st.binary(max_size=12), min_size=1, max_size=4)
                    .map(lambda parts: b64(b"\x00".join(parts))))


@given(st.sampled_from(sasl.MECHANISMS), st.lists(ANSWERS, max_size=4))
def test_any_answers_give_challenges_then_one_end_that_says_what_was_sent(mechanism, answers):
    """However the client answers: challenges only until the exchange ends
    (PLAIN asks once, LOGIN twice), then one end, and credentials hold
    exactly what the client's base64 said."""
    exchange = sasl.Exchange(mechanism)
    steps = [exchange.start()]
    for answer in answers:
        if not isinstance(steps[-1], sasl.Challenge):
            break
        steps.append(exchange.answer(answer))
    assert all(isinstance(step, sasl.Challenge) for step in steps[:-1])
    assert len(steps) - 1 <= {"PLAIN": 1, "LOGIN": 2}[mechanism]
    last = steps[-1]
    if isinstance(last, sasl.Challenge):
        assert len(steps) - 1 == len(answers)  # only when the client has not finished
        return
    if isinstance(last, sasl.Credentials):
        decoded = [base64.b64decode(a) for a in answers[:len(steps) - 1]]
        if mechanism == "LOGIN":
            assert (last.authcid, last.secret, last.mechanism) == (decoded[0], decoded[1], "login")
        else:
            assert b"\x00".join([last.authzid, last.authcid, last.secret]) == decoded[0]
            assert last.mechanism == "plain"
    else:
        assert isinstance(last, sasl.Failed) and last.kind in ("cancelled", "base64", "malformed")
        assert last.kind != "cancelled" or answers[len(steps) - 2] == b"*"