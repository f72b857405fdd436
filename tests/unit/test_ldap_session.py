"""The LDAP session as a state machine: bytes and decided binds in, actions
out, with no I/O."""

from hypothesis import given, strategies as st
from ldaptor.protocols import pureldap

from proxy.auth.ldappolicy import SessionPolicy
from proxy.frontends.ldap import (
    Refused,
    Abandon,
    BeginTLS,
    DecideBind,
    Disconnect,
    Forget,
    Hangup,
    Identity,
    LDAPSession,
    Relay,
    Reply,
)
from proxy.wire import ber

DN = "uid=alice,ou=people,dc=example,dc=test"


def session(**kw):
    values = dict(tls=False, starttls=True, max_before_bind=4096,
                  max_after_bind=1 << 20, max_depth=32)
    values.update(kw)
    return LDAPSession(**values)


def wire(op, id=1, controls=None):
    return pureldap.LDAPMessage(op, id=id, controls=controls).toWire()


def bind(name="alice", password="secret", id=1):
    return wire(pureldap.LDAPBindRequest(dn=name.encode(), auth=password.encode()), id)


def search(id=2, **kw):
    return wire(pureldap.LDAPSearchRequest(baseObject=b"dc=example,dc=test"), id, **kw)


def codes(actions):
    """The result codes the session answers with: its own replies, and the
    refusals of the core's session policy (answered and audited by the server)."""
    return [ber.parse_result_code(ber.parse_message(a.data)) if isinstance(a, Reply)
            else a.refusal.code for a in actions if isinstance(a, (Reply, Refused))]


def test_a_bind_is_decided_and_what_follows_waits_for_it():
    s = session()
    actions = s.feed(bind() + search())
    assert isinstance(actions[0], Forget) and isinstance(actions[1], DecideBind)
    assert (actions[1].name, actions[1].password) == ("alice", "secret")
    assert len(actions) == 2 and s.binding  # the search waits
    after = s.bound(actions[1].message, ber.SUCCESS, "", Identity("app_password", DN, SessionPolicy(True, True, DN)))
    assert codes(after) == [0]
    (relay,) = [a for a in after if isinstance(a, Relay)]
    assert ber.control_types(ber.parse_message(relay.frame)) == [ber.PROXIED_AUTHORIZATION]


def test_syntax_is_refused_without_the_core():
    s = session()
    sasl = wire(pureldap.LDAPBindRequest(dn=b"", auth=(b"PLAIN", b""), sasl=True))
    unauthenticated = bind(password="", id=2)
    actions = s.feed(sasl + unauthenticated)
    assert codes(actions) == [ber.AUTH_METHOD_NOT_SUPPORTED, ber.UNWILLING_TO_PERFORM]
    assert not any(isinstance(a, DecideBind) for a in actions)
    (anonymous,) = [a for a in s.feed(bind("", "", 3)) if isinstance(a, DecideBind)]
    assert (anonymous.name, anonymous.password) == ("", "")


def test_operations_need_a_bind_and_app_passwords_write_nothing():
    s = session()
    assert codes(s.feed(search())) == [ber.OPERATIONS_ERROR]
    decide = s.feed(bind())[1]
    s.bound(decide.message, ber.SUCCESS, "", Identity("app_password", DN, SessionPolicy(True, True)))
    modify = wire(pureldap.LDAPModifyRequest(object=DN.encode(), modification=[]), 3)
    assert codes(s.feed(modify)) == [ber.INSUFFICIENT_ACCESS_RIGHTS]
    compare = wire(pureldap.LDAPCompareRequest(entry=DN.encode(), ava=pureldap.LDAPAttributeValueAssertion(
        pureldap.LDAPAttributeDescription(b"userPassword"), pureldap.LDAPAssertionValue(b"x"))), 4)
    assert codes(s.feed(compare)) == [ber.INSUFFICIENT_ACCESS_RIGHTS]
    own = search(5, controls=[(ber.PROXIED_AUTHORIZATION.encode(), True, b"dn:cn=admin")])
    assert codes(s.feed(own)) == [ber.AUTHORIZATION_DENIED]


def test_primary_sessions_relay_as_they_are():
    s = session()
    decide = s.feed(bind())[1]
    s.bound(decide.message, ber.SUCCESS, "", Identity("primary", DN))
    modify = wire(pureldap.LDAPModifyRequest(object=DN.encode(), modification=[]), 3)
    (relay,) = s.feed(modify)
    assert isinstance(relay, Relay) and relay.frame == modify


def test_starttls_drops_what_came_behind_it_in_the_clear():
    s = session()
    start = wire(pureldap.LDAPExtendedRequest(requestName=ber.START_TLS.encode()))
    actions = s.feed(start + bind(id=2))
    assert codes(actions) == [0] and isinstance(actions[-1], BeginTLS)
    assert s.tls and s.buffered == 0
    assert codes(s.feed(start)) == [ber.OPERATIONS_ERROR]  # already


def test_who_am_i_unbind_abandon_and_bad_ids():
    s = session()
    decide = s.feed(bind())[1]
    s.bound(decide.message, ber.SUCCESS, "", Identity("primary", DN))
    who = wire(pureldap.LDAPExtendedRequest(requestName=ber.WHO_AM_I.encode()), 2)
    (reply,) = s.feed(who)
    assert reply.data.endswith(b"dn:" + DN.encode())
    abandon = wire(pureldap.LDAPAbandonRequest(id=2), 3)
    assert isinstance(s.feed(abandon)[0], Abandon)
    assert isinstance(s.feed(wire(pureldap.LDAPUnbindRequest(), 4))[0], Hangup)
    assert s.feed(search()) == []  # closed
    assert isinstance(session().feed(search(id=0))[0], Disconnect)


def test_a_message_larger_than_allowed_before_a_bind_ends_the_session():
    s = session(max_before_bind=1024)
    (action,) = s.feed(b"\x30\x84\x00\x01\x00\x00")
    assert isinstance(action, Disconnect) and action.code == ber.PROTOCOL_ERROR


@given(st.lists(st.binary(max_size=40), max_size=8))
def test_any_bytes_keep_the_buffer_bounded_and_nothing_follows_the_end(chunks):
    """Whatever the client sends before a bind: what is held never passes
    the limit before a bind, a Disconnect or Hangup is the last action, and
    nothing comes after it."""
    s = session(max_before_bind=64)
    ended = False
    for chunk in chunks:
        actions = s.feed(chunk)
        assert not (ended and actions), f"actions after the end: {actions}"
        for index, action in enumerate(actions):
            if isinstance(action, (Disconnect, Hangup)):
                ended = True
                assert index == len(actions) - 1, "the end is the last action"
            if isinstance(action, DecideBind):
                after = s.bound(action.message, ber.INVALID_CREDENTIALS)
                assert not (ended and after)
                ended = ended or any(isinstance(a, (Disconnect, Hangup)) for a in after)
        assert s.buffered <= 64
