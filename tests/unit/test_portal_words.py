"""What the portal's pages say (proxy.portal.words): no I/O, no browser."""

from datetime import datetime, timezone

import pytest

from proxy.directory import Account
from proxy.portal.words import audit_time, end_of_day, is_refusal_of, mfa_in_effect, quoted, refusal
from proxy.store import MfaState


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def test_an_expiry_date_works_to_the_last_second_of_that_day_not_into_the_next():
    # Listed as 2027-03-07 23:59, not 2027-03-08 00:00.
    assert end_of_day("2027-03-07", "") == utc("2027-03-07T23:59:59")
    assert datetime.fromtimestamp(end_of_day("2027-03-07", None), timezone.utc).date().isoformat() \
        == "2027-03-07"


@pytest.mark.parametrize("offset, end", [
    ("330", "2027-03-07T18:29:59"),  # India: the day ends at 18:30 UTC
    ("-300", "2027-03-08T04:59:59"),  # New York in winter
    ("60", "2027-03-07T22:59:59"),
    ("not a number", "2027-03-07T23:59:59"),  # what the browser did not say well: UTC
    ("1000", "2027-03-07T23:59:59"),  # no zone is 16 hours from UTC
])
def test_the_end_of_the_day_is_where_the_browser_is(offset, end):
    assert end_of_day("2027-03-07", offset) == utc(end)


def test_what_is_not_a_date_is_refused():
    with pytest.raises(ValueError):
        end_of_day("2027-02-30", "")


def test_names_are_quoted_for_people_not_as_a_program_would():
    assert quoted('Bob\'s "work" phone') == '“Bob\'s "work" phone”'
    assert quoted("<b>nobody</b>") == "“<b>nobody</b>”"  # the template escapes it


def test_a_refused_sign_in_says_which_app_password_and_what_is_known():
    event = {"time": "2026-12-07T05:01:02.345Z", "event": "authentication", "outcome": "refused",
             "reason": "out_of_scope", "user": "ann", "app_password_id": "x1",
             "app_password_name": "Bob's phone", "protocol": "imap", "client_address": "192.0.2.7"}
    row = refusal(event)
    assert row.at == pytest.approx(utc("2026-12-07T05:01:02.345"))
    assert (row.address, row.protocol, row.app_password) == ("192.0.2.7", "IMAP", "Bob's phone")
    assert row.why == "app password not allowed there"
    # A refused secret of a user who must use app passwords is not taken
    # for their primary password: the core never checked it against the directory.
    wrong = refusal({**event, "reason": "mfa_required", "app_password_name": None})
    assert "primary password" not in wrong.why and "not one of their app passwords" in wrong.why
    assert wrong.app_password is None
    assert refusal({"reason": "something_new"}).why == "something_new"
    assert audit_time("yesterday") is None


def test_only_refusals_of_that_user_are_picked():
    wanted = is_refusal_of("ann")
    assert wanted({"event": "authentication", "user": "ann", "outcome": "refused"})
    assert wanted({"event": "authentication", "user": "ann", "outcome": "temporary_failure"})
    assert not wanted({"event": "authentication", "user": "ann", "outcome": "accepted"})
    assert not wanted({"event": "authentication", "user": "bob", "outcome": "refused"})
    assert not wanted({"event": "portal_sign_in", "user": "ann", "outcome": "refused"})


def test_the_mfa_state_in_effect_is_shown_first_when_a_group_enforces_it():
    plain = Account(dn="uid=ann,dc=x", username="ann", active=True)
    grouped = Account(dn="uid=bob,dc=x", username="bob", active=True, mfa_enforced=True)
    assert mfa_in_effect(plain, MfaState.DISABLED).text == "disabled"
    assert not mfa_in_effect(plain, MfaState.DISABLED).hidden
    shown = mfa_in_effect(grouped, MfaState.DISABLED)
    assert shown.effective == "enforced" and shown.hidden
    assert shown.text == ("enforced (by a directory group; set here: disabled, which applies only "
                          "if they leave the group)")
    assert shown.consequence == "only app passwords work on cloud listeners"
    assert not mfa_in_effect(grouped, MfaState.ENFORCED).hidden


def test_only_lines_naming_the_user_are_parsed_and_nothing_of_theirs_is_missed(tmp_path):
    from proxy.audit import AuditLog, recent_events
    from proxy.portal.words import needle_of

    log = AuditLog(tmp_path / "audit.log", lambda: 1_800_000_000.0)
    names = ["ann", "anne", "josé", "o'neil", 'say "hi"', "back\\slash", "rtl\u202eevil"]
    for name in names:
        for outcome in ("refused", "accepted"):
            log.append(log.event("authentication", user=name, outcome=outcome, reason="x"))
    log.append(log.event("authentication", user="bob", outcome="refused", reason="x",
                         app_password_name='"ann"'))  # another's line holding the needle
    for name in names:
        needle = needle_of(name)
        found = recent_events(log.path, is_refusal_of(name), 10, 1 << 20, needle)
        assert [e["user"] for e in found] == [name], (name, needle)
    assert needle_of("ann") == b'"ann"' and needle_of('say "hi"') is None
    assert needle_of("rtl\u202eevil") is None  # the audit writes it escaped
