"""The one list of secret attributes (proxy/auth/ldappolicy.py), applied to
what an LDAP session opened with an app password asks and reads: bytes in,
bytes out, checked with ldaptor's decoder."""

from hypothesis import given, strategies as st
from ldaptor import ldapfilter
from ldaptor.protocols import pureber, pureldap

from proxy.auth import ldappolicy
from proxy.auth.ldappolicy import SECRET_ATTRIBUTES, SessionPolicy
from proxy.wire import ber

APP = SessionPolicy(read_only=True, reads_as_user=True)
PAGED = (b"1.2.840.113556.1.4.319", True,
         pureber.BERSequence([pureber.BERInteger(500), pureber.BEROctetString(b"")]).toWire())
DECODER = pureldap.LDAPBERDecoderContext_TopLevel(
    inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
        fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext())))


def search(attributes=(), filter="(objectClass=*)", controls=None, id=7):
    op = pureldap.LDAPSearchRequest(
        baseObject=b"DC=ad,DC=example,DC=test", scope=2, sizeLimit=0,
        filter=ldapfilter.parseFilter(filter) if isinstance(filter, str) else filter,
        attributes=[a.encode() for a in attributes])
    return pureldap.LDAPMessage(op, id=id, controls=controls).toWire()


def decode(frame):
    message, used = pureber.berDecodeObject(DECODER, frame)
    assert used == len(frame)
    return message


def relayed(frame, policy=APP):
    verdict = policy.request(ber.parse_message(frame))
    assert isinstance(verdict, bytes), verdict
    return verdict


def test_secret_attributes_are_taken_out_of_the_attributes_asked_for():
    asked = ["cn", "userPassword", "unicodePwd;binary", "OID.1.2.840.113556.1.4.90",
             "msDS-ManagedPassword", "ms-Mcs-AdmPwd", "MSLAPS-PASSWORD", "*", "+", "mail"]
    out = decode(relayed(search(asked, controls=[PAGED])))
    assert out.id == 7 and out.value.attributes == [b"cn", b"*", b"+", b"mail"]
    original = decode(search(asked))
    assert out.value.baseObject == original.value.baseObject
    assert out.value.filter.asText() == original.value.filter.asText()
    assert [c[0] for c in out.controls] == [PAGED[0]]  # the cookie's control kept
    assert out.controls[0][2] == PAGED[2]


def test_asking_for_secrets_alone_asks_for_no_attributes_not_all():
    out = decode(relayed(search(["userPassword", "supplementalCredentials"])))
    assert out.value.attributes == [b"1.1"]


def test_a_search_without_secrets_is_relayed_byte_for_byte():
    for frame in (search(), search(["cn", "*", "+"]), search(["1.1"], controls=[PAGED])):
        assert relayed(frame) == frame
    primary = search(["userPassword"], "(userPassword=a*)")
    assert relayed(primary, ldappolicy.PRIMARY) == primary


BY_OID = pureldap.LDAPFilter_equalityMatch(  # (2.5.4.35=x): ldaptor parses no OIDs
    attributeDesc=pureldap.LDAPAttributeDescription(b"2.5.4.35"),
    assertionValue=pureldap.LDAPAssertionValue(b"x"))


def test_a_filter_on_a_secret_is_refused():
    for text in ("(userPassword=Secret*)", "(&(cn=alice)(!(unicodePwd=*)))",
                 "(|(cn=a)(userpassword;binary>=x))", BY_OID,
                 "(:caseExactMatch:=Secret-1)",  # any attribute
                 "(ms-Mcs-AdmPwd~=x)"):
        verdict = APP.request(ber.parse_message(search(["cn"], text)))
        assert verdict == ldappolicy.FILTER, text
    for text in ("(cn=alice)", "(userAccountControl:1.2.840.113556.1.4.803:=2)",
                 "(&(objectClass=user)(|(sAMAccountName=a*)(mail=*)))"):
        assert relayed(search(["cn"], text)) == search(["cn"], text), text


def entry(name, attributes, id=7):
    return pureldap.LDAPMessage(pureldap.LDAPSearchResultEntry(
        objectName=name, attributes=[(k, v) for k, v in attributes]), id=id).toWire()


def test_secret_attributes_are_taken_out_of_entries_and_hidden_entries_dropped():
    frame = entry("CN=alice,OU=People,DC=ad,DC=example,DC=test", [
        ("cn", ["alice"]), ("userPassword", ["Secret-1"]), ("msDS-KeyCredentialLink", ["B:8:x"]),
        ("unicodePwd", ["x"]), ("ms-Mcs-AdmPwd", ["x"]), ("mail", ["a@example.test"])])
    out = decode(ldappolicy.readable(frame, lambda dn: False))
    assert [(a, list(v)) for a, v in out.value.attributes] == [
        (b"cn", [b"alice"]), (b"mail", [b"a@example.test"])]
    clean = entry("CN=bob,DC=x", [("cn", ["bob"])])
    assert ldappolicy.readable(clean, lambda dn: False) == clean
    assert ldappolicy.readable(clean, lambda dn: dn == b"CN=bob,DC=x") == b""


def test_references_are_dropped_and_referrals_answered_as_no_such_object():
    reference = pureldap.LDAPMessage(pureldap.LDAPSearchResultReference(
        uris=[pureldap.LDAPString(b"ldap://ad.example.test/CN=Configuration,DC=ad,DC=example,DC=test")]),
        id=7).toWire()
    assert ldappolicy.readable(reference, lambda dn: False) == b""
    # A SearchResultDone with a referral and a control (ldaptor writes no referrals).
    done = ber.result(7, ber.SEARCH_RESULT_DONE, ber.REFERRAL, "go there", "DC=test",
                      extra=ber.tlv(0xA3, ber.tlv(ber.OCTET_STRING,
                                                  b"ldap://other.test/DC=other,DC=test")))
    control = pureldap.LDAPControls([pureldap.LDAPControl(*PAGED)]).toWire()
    referral = ber.tlv(ber.SEQUENCE, done[2:] + control)
    assert decode(referral).value.resultCode == ber.REFERRAL
    out = decode(ldappolicy.readable(referral, lambda dn: False))
    assert out.id == 7 and out.value.resultCode == ber.NO_SUCH_OBJECT
    assert out.value.matchedDN == b"DC=test" and not out.value.referral
    assert b"other.test" not in ldappolicy.readable(referral, lambda dn: False)
    assert [c[0] for c in out.controls] == [PAGED[0]]
    done = pureldap.LDAPMessage(pureldap.LDAPSearchResultDone(resultCode=0), id=7).toWire()
    assert ldappolicy.readable(done, lambda dn: False) == done


NAMES = st.sampled_from(["cn", "mail", "userPassword", "unicodePwd", "*", "+", "1.1",
                         "msDS-ManagedPassword;binary", "sAMAccountName", "OID.2.5.4.35"])


@given(st.lists(NAMES, max_size=8))
def test_the_attributes_asked_for_are_those_asked_less_the_secrets(asked):
    out = decode(relayed(search(asked))).value.attributes
    kept = [a.encode() for a in asked
            if ber.attribute_type(a.encode()) not in SECRET_ATTRIBUTES]
    assert out == (kept if kept or not asked else [b"1.1"])
