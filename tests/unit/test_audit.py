import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from proxy.audit import AuditLog, timestamp
from proxy.wire.text import json_printable


def test_events_are_one_json_object_a_line(tmp_path):
    path = tmp_path / "audit.log"
    audit = AuditLog(path, clock=lambda: 1794787200.25)
    audit.record("app_password_created", user="alice", app_password_id="ab12", expires_at=None)
    audit.record("app_password_deleted", user="bøb", app_password_id="cd34")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"time": "2026-11-16T00:00:00.250Z", "event": "app_password_created",
         "user": "alice", "app_password_id": "ab12"},
        {"time": "2026-11-16T00:00:00.250Z", "event": "app_password_deleted",
         "user": "bøb", "app_password_id": "cd34"},
    ]
    assert os.stat(path).st_mode & 0o777 == 0o640


SPLITTERS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def test_a_value_with_a_line_break_of_any_kind_stays_on_its_line(tmp_path):
    """JSON leaves U+0085, U+2028 and U+2029 raw; str.splitlines() splits
    there. Every such character, and an escape sequence, is escaped: one
    event is one line for every reader, and the same value when decoded."""
    path = tmp_path / "audit.log"
    audit = AuditLog(path, clock=lambda: 0.0)
    names = [f"a{c}b" for c in SPLITTERS] + ["bøb\u202e", "x\x1b[31mred", "emoji\U0001f600\U000e0001"]
    for name in names:
        audit.record("sign_in", user=name, client_address="fe80::1%\x1b[31mZONE\nX")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) == len(names)
    assert [json.loads(line)["user"] for line in lines] == names
    assert all(line.isprintable() for line in lines)
    assert "bøb" in text and "\U0001f600" in text  # printable text stays readable


VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    # Times and counts; under 1e-4 orjson writes 0.00001 where json.dumps
    # wrote 1e-05 (the same number), and NaN and infinities (never JSON) as null.
    | st.just(0.0) | st.floats(1e-4, 1e18) | st.floats(-1e18, -1e-4)
    | st.text(st.characters(codec=None, exclude_categories=())),  # surrogates too
    lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@given(st.dictionaries(st.text(max_size=8), VALUES, max_size=6))
def test_a_line_is_what_json_dumps_made_escaped(fields):
    """The line orjson makes is the one json.dumps made before it, byte for
    byte, lone surrogates (which orjson refuses) included."""
    before = json_printable(json.dumps(fields, ensure_ascii=False, separators=(",", ":")))
    assert AuditLog.line(fields) == before


@pytest.mark.parametrize("field", ["secret", "password", "password_hash", "lookup_key"])
def test_an_event_never_carries_a_secret(tmp_path, field):
    audit = AuditLog(tmp_path / "audit.log", clock=lambda: 0.0)
    with pytest.raises(ValueError):
        audit.event("x", **{field: "abcd"})


def test_events_go_to_the_twisted_log_too():
    audit = AuditLog(None, clock=lambda: 0.0)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        audit.record("mfa_state_changed", user="alice", state="enforced")
    finally:
        globalLogPublisher.removeObserver(events.append)
    ours = [e for e in events if e.get("log_namespace") == "legacy_auth_proxy.audit"]
    assert ours[0]["audit"]["state"] == "enforced"


def test_reopen_follows_a_rotated_file(tmp_path):
    path = tmp_path / "audit.log"
    audit = AuditLog(path, clock=lambda: 0.0)
    audit.record("one")
    path.rename(tmp_path / "audit.log.1")
    audit.reopen()
    audit.record("two")
    assert json.loads(path.read_text())["event"] == "two"
    assert json.loads((tmp_path / "audit.log.1").read_text())["event"] == "one"


def test_timestamps_are_rfc3339_utc():
    assert timestamp(0) == "1970-01-01T00:00:00.000Z"
