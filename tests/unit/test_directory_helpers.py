from datetime import datetime, timezone

import pytest
from hypothesis import given, strategies as st
from ldaptor.ldapfilter import parseFilter

from proxy.directory import escape_filter_value, looks_like_dn, parse_password_changed
from proxy.wire.dn import normalise_dn


@pytest.mark.parametrize("raw, escaped", [
    ("alice", "alice"), ("a*", "a\\2a"), ("(x)", "\\28x\\29"), ("a\\b", "a\\5cb"),
    ("nul\x00", "nul\\00"), ("jürgen", "jürgen"),
])
def test_rfc4515_escaping(raw, escaped):
    assert escape_filter_value(raw) == escaped


@given(st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s))
def test_an_escaped_name_is_always_one_equality_test_of_exactly_that_name(name):
    parsed = parseFilter(f"(uid={escape_filter_value(name)})")
    assert type(parsed).__name__ == "LDAPFilter_equalityMatch"
    value = parsed.assertionValue.value
    assert (value.decode() if isinstance(value, bytes) else value) == name


def test_password_changed_times():
    expected = datetime(2026, 11, 22, 1, 2, 3, tzinfo=timezone.utc).timestamp()
    assert parse_password_changed(b"20261122010203Z") == expected
    assert parse_password_changed(b"20261122010203.25Z") == expected + 0.25
    # Active Directory's pwdLastSet: 100 ns ticks since 1601-01-01.
    ticks = int((expected + 11_644_473_600) * 10_000_000)
    assert parse_password_changed(str(ticks).encode()) == pytest.approx(expected)
    assert parse_password_changed(b"0") is None  # "must change at next logon"
    assert parse_password_changed(b"garbage") is None


def test_dns_compare_without_case_or_spacing():
    assert normalise_dn("UID=Alice, OU=People,DC=Example,DC=Test") == normalise_dn(
        "uid=alice,ou=people,dc=example,dc=test")
    assert looks_like_dn("uid=alice,dc=example,dc=test")
    assert not looks_like_dn("alice@example.test")
