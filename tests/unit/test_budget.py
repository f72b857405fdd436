"""The daemon-wide budget for clients not signed in."""

from proxy.frontends.base import PreLoginBudget


def test_connections_past_the_limit_are_refused_and_leaving_makes_room():
    budget = PreLoginBudget(max_connections=2, max_bytes=1000)
    a, b, c = object(), object(), object()
    assert budget.admit(a) and budget.admit(b) and not budget.admit(c)
    budget.leave(a)
    assert budget.admit(c) and budget.connections == 2


def test_only_a_connection_that_grows_past_the_budget_is_refused():
    budget = PreLoginBudget(max_connections=10, max_bytes=1000)
    a, b = object(), object()
    budget.admit(a), budget.admit(b)
    assert budget.hold(a, 900)
    assert not budget.hold(b, 200)  # b grew past it: b is closed
    assert budget.hold(a, 800)  # a shrank: never closed for what b did
    budget.leave(b)
    assert budget.bytes == 800 and budget.hold(a, 1000)


def test_signed_in_connections_are_not_counted():
    budget = PreLoginBudget(max_connections=10, max_bytes=100)
    a = object()
    budget.admit(a)
    budget.hold(a, 50)
    budget.leave(a)
    assert budget.hold(a, 10_000) and budget.bytes == 0 and budget.connections == 0
    budget.leave(a)  # twice is harmless
    assert budget.connections == 0
