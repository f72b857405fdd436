"""Text from outside, made safe for a terminal, a page or a log line."""

import json

from hypothesis import given, strategies as st

from proxy.wire.text import json_printable, printable


def test_what_is_not_printable_shows_as_an_escape():
    assert printable("fe80::1%\x1b[31mZONE\nX") == "fe80::1%\\x1b[31mZONE\\x0aX"
    assert printable("a\u2028b\x85c\u202ed\U000e0001") == "a\\u2028b\\x85c\\u202ed\\U000e0001"
    assert printable("José 李 DOMAIN\\sam 😀") == "José 李 DOMAIN\\sam 😀"


@given(st.text())
def test_anything_becomes_one_printable_line(text):
    shown = printable(text)
    assert shown.isprintable() and len(shown.splitlines()) <= 1


@given(st.dictionaries(st.text(), st.text()))
def test_json_lines_decode_to_the_same_value_and_stay_one_line(value):
    line = json_printable(json.dumps(value, ensure_ascii=False))
    assert line.isprintable() and len(line.splitlines()) == 1
    assert json.loads(line) == value
