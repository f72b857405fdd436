"""The LDAP front end's BER codec, against ldaptor's as the reference."""

import pytest
from hypothesis import given, strategies as st
from ldaptor.protocols import pureber, pureldap

from proxy.wire import ber

DECODER = pureldap.LDAPBERDecoderContext_TopLevel(
    inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
        fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
    )
)


def decode(data):
    message, used = pureber.berDecodeObject(DECODER, data)
    assert used == len(data)
    return message


def bind_wire(id, dn, password):
    return pureldap.LDAPMessage(pureldap.LDAPBindRequest(dn=dn, auth=password), id=id).toWire()


@given(st.integers(1, 2**31 - 1), st.binary(max_size=300), st.binary(max_size=300))
def test_binds_read_as_ldaptor_writes_them(id, dn, password):
    frames = ber.Framer(1 << 20).feed(bind_wire(id, dn, password))
    assert len(frames) == 1
    message = ber.parse_message(frames[0])
    assert (message.id, message.op_tag) == (id, ber.BIND_REQUEST)
    bind = ber.parse_bind(message)
    assert (bind.version, bind.name, bind.password, bind.mechanism) == (3, dn, password, None)


def test_sasl_binds_name_their_mechanism():
    wire = pureldap.LDAPMessage(
        pureldap.LDAPBindRequest(dn=b"", auth=(b"GSSAPI", b"x"), sasl=True), id=3).toWire()
    bind = ber.parse_bind(ber.parse_message(wire))
    assert bind.password is None and bind.mechanism == b"GSSAPI"


@given(st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 49, 50, 53]), st.text(max_size=200))
def test_results_are_what_ldaptor_reads(id, code, text):
    decoded = decode(ber.result(id, ber.BIND_RESPONSE, code, text))
    assert decoded.id == id
    assert isinstance(decoded.value, pureldap.LDAPBindResponse)
    assert decoded.value.resultCode == code
    assert decoded.value.errorMessage == text.encode()


def test_extended_requests_and_responses():
    wire = pureldap.LDAPMessage(pureldap.LDAPStartTLSRequest(), id=1).toWire()
    assert ber.parse_extended(ber.parse_message(wire)).name == ber.START_TLS
    own = ber.extended_request(2, ber.WHO_AM_I)
    assert ber.parse_extended(ber.parse_message(own)).name == ber.WHO_AM_I
    decoded = decode(ber.extended_response(7, 0, value=b"dn:uid=a,dc=x"))
    assert decoded.value.response == b"dn:uid=a,dc=x"
    notice = decode(ber.notice_of_disconnection(ber.UNAVAILABLE, "bye"))
    assert notice.id == 0 and notice.value.responseName == ber.NOTICE_OF_DISCONNECTION.encode()


def test_own_bind_requests_read_back():
    bind = ber.parse_bind(ber.parse_message(ber.bind_request(5, "cn=x", "pw")))
    assert (bind.name, bind.password) == (b"cn=x", b"pw")


@given(st.lists(st.integers(1, 1000), min_size=1, max_size=5), st.integers(1, 7))
def test_framing_any_split_gives_the_same_messages(ids, chunk):
    stream = b"".join(bind_wire(i, b"uid=%d" % i, b"pw") for i in ids)
    framer = ber.Framer(1 << 16)
    frames = []
    for i in range(0, len(stream), chunk):
        frames += framer.feed(stream[i:i + chunk])
    assert [ber.parse_message(f).id for f in frames] == ids
    assert framer.buffered == 0


def test_a_huge_length_is_refused_from_its_header_alone():
    framer = ber.Framer(256 * 1024)
    with pytest.raises(ber.TooLarge):
        framer.feed(b"\x30\x84\xff\xff\xff\xff")
    assert framer.buffered <= 6
    framer = ber.Framer(100)
    with pytest.raises(ber.TooLarge):
        framer.feed(b"\x30\x81\x80")
    with pytest.raises(ber.TooLarge):
        ber.Framer(1 << 30).feed(b"\x30\x85\x01\x00\x00\x00\x00")


@pytest.mark.parametrize("data", [
    b"\x04\x01a",               # not a SEQUENCE
    b"\x30\x80\x00\x00",        # indefinite length
    b"\x30\x03\x02\x05\x01",    # an element longer than its container
    b"\x30\x02\x1f\x01",        # a multi-byte tag
])
def test_malformed_bytes_are_refused(data):
    with pytest.raises(ber.BERError):
        ber.Framer(1024).feed(data)


def test_nesting_is_limited_without_recursion():
    inner = b"\x04\x00"
    for _ in range(10_000):
        inner = ber.tlv(0x30, inner)
    with pytest.raises(ber.BERError, match="nested"):
        ber.Framer(1 << 20, max_depth=32).feed(inner)
    shallow = b"\x04\x00"
    for _ in range(10):
        shallow = ber.tlv(0x30, shallow)
    assert ber.Framer(1 << 20, max_depth=32).feed(shallow) == [shallow]


def test_truncated_bodies_are_refused_when_parsed():
    with pytest.raises(ber.BERError):
        ber.parse_message(b"\x30\x03\x02\x01\x01")
    with pytest.raises(ber.BERError):
        ber.parse_bind(ber.parse_message(ber.message(1, ber.tlv(0x60, b"\x02\x01\x03"))))


def test_a_control_is_added_after_the_ones_a_message_carries():
    from ldaptor.protocols import pureldap

    from proxy.wire import ber

    search = pureldap.LDAPSearchRequest(baseObject=b"dc=example,dc=test")
    for controls in (None, [(b"1.2.840.113556.1.4.319", False, b"\x30\x05\x02\x01\x05\x04\x00")]):
        frame = pureldap.LDAPMessage(search, id=7, controls=controls).toWire()
        message = ber.parse_message(frame)
        added = ber.with_control(message, ber.PROXIED_AUTHORIZATION, b"dn:uid=a,dc=example,dc=test")
        parsed = ber.parse_message(added)
        assert parsed.id == 7 and parsed.op == message.op
        expected = [c[0].decode() for c in controls or []] + [ber.PROXIED_AUTHORIZATION]
        assert ber.control_types(parsed) == expected
        back, _ = pureber.berDecodeObject(DECODER, added)  # the reference decoder agrees
        oid, critical, value = back.controls[-1]
        assert (oid, bool(critical), value) == (b"2.16.840.1.113730.3.4.18", True,
                                                b"dn:uid=a,dc=example,dc=test")


def test_password_attributes_are_taken_out_of_an_entry():
    from ldaptor.protocols import pureldap

    from proxy.wire import ber

    entry = pureldap.LDAPSearchResultEntry(
        objectName=b"uid=a,dc=example,dc=test",
        attributes=[(b"cn", [b"A"]), (b"userPassword", [b"{SSHA}x"]),
                    (b"userpassword;binary", [b"y"]), (b"mail", [b"a@x", b"b@x"])])
    frame = pureldap.LDAPMessage(entry, id=9).toWire()
    names = frozenset({b"userpassword"})
    stripped = ber.without_attributes(ber.parse_message(frame), names)
    back, _ = pureber.berDecodeObject(DECODER, stripped)
    assert back.id == 9 and back.value.objectName == b"uid=a,dc=example,dc=test"
    assert [(a, list(v)) for a, v in back.value.attributes] == [
        (b"cn", [b"A"]), (b"mail", [b"a@x", b"b@x"])]
    clean = pureldap.LDAPMessage(pureldap.LDAPSearchResultEntry(
        objectName=b"uid=a", attributes=[(b"cn", [b"A"])]), id=1).toWire()
    assert ber.without_attributes(ber.parse_message(clean), names) is None
