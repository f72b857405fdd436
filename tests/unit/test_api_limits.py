"""The API's rate per token, on task.Clock: a minute's burst, refilled evenly."""

from twisted.internet.task import Clock

from proxy.api import views
from proxy.api.limits import Limits


def test_a_minutes_worth_then_429_with_the_wait_until_the_next():
    clock = Clock()
    limits = Limits(clock.seconds)
    assert [limits.take("a", 6) for _ in range(6)] == [0] * 6
    assert limits.take("a", 6) == 10  # one request every 10 s
    assert limits.take("b", 6) == 0  # another token has its own
    clock.advance(9.9)
    assert limits.take("a", 6) == 1
    clock.advance(0.2)
    assert limits.take("a", 6) == 0
    assert limits.waiting("a", 6) == 10


def test_forgotten_keys_start_full_and_the_table_stays_bounded():
    clock = Clock()
    limits = Limits(clock.seconds, keys=2)
    limits.take("a", 1)
    limits.take("b", 1)
    limits.take("c", 1)  # "a" forgotten
    assert limits.take("a", 1) == 0
    assert len(limits._buckets._data) == 2


def test_page_tokens_are_ours_or_refused():
    assert views.after_of(views.page_token("0a1b2c3d4e")) == "0a1b2c3d4e"
    for bad in ("", "nonsense", "djE6", views.page_token("0a") + "==", "!!!"):
        assert views.after_of(bad) in (None, "0a")
    assert views.after_of("djE6WllaWg") is None  # "v1:ZZZZ": not an id
