"""Throttling rules, driven by a task.Clock."""

import ipaddress

import pytest
from twisted.internet.task import Clock

from proxy.auth.throttle import Throttle
from proxy.config import ThrottleConfig

HOME = "192.0.2.10"
ATTACKER = "198.51.100.66"


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def throttle(clock):
    return Throttle(ThrottleConfig(), clock.seconds)


def fail_distinct(throttle, n, source=ATTACKER, account="alice", prefix="guess"):
    return [throttle.failed(account, source, f"{prefix}{i}") for i in range(n)]


def test_ten_distinct_wrong_secrets_lock_for_a_minute(throttle, clock):
    assert fail_distinct(throttle, 9) == [False] * 9
    assert throttle.locked("alice", ATTACKER) == 0
    assert throttle.failed("alice", ATTACKER, "guess9") is True
    assert throttle.locked("alice", ATTACKER) == 60
    clock.advance(59)
    assert throttle.locked("alice", ATTACKER) == 1
    clock.advance(1)
    assert throttle.locked("alice", ATTACKER) == 0


def test_lockouts_double_on_repeat_up_to_fifteen_minutes(throttle, clock):
    lengths = []
    for round in range(7):
        fail_distinct(throttle, 10, prefix=f"r{round}-")
        lengths.append(throttle.locked("alice", ATTACKER))
        clock.advance(lengths[-1])
    assert lengths == [60, 120, 240, 480, 900, 900, 900]


def test_a_repeat_of_the_last_three_wrong_secrets_does_not_count(throttle):
    for _ in range(50):
        for stale in ("old-password", "older", "oldest"):
            assert throttle.failed("alice", HOME, stale) is False
    assert throttle.locked("alice", HOME) == 0
    # They counted once each: seven new ones make the ten.
    assert fail_distinct(throttle, 7, source=HOME) == [False] * 6 + [True]


def test_failures_are_forgotten_after_the_window(throttle, clock):
    fail_distinct(throttle, 9)
    clock.advance(901)
    assert throttle.failed("alice", ATTACKER, "late") is False
    assert throttle.locked("alice", ATTACKER) == 0


def test_an_attacker_elsewhere_cannot_lock_the_owner_out_of_a_familiar_place(throttle):
    throttle.succeeded("alice", HOME)
    fail_distinct(throttle, 10, source=ATTACKER)
    assert throttle.locked("alice", ATTACKER) == 60
    assert throttle.locked("alice", HOME) == 0
    # Another unfamiliar place shares the attacker's counter, and is locked too.
    assert throttle.locked("alice", "203.0.113.5") == 60
    # Failures from home count on their own.
    fail_distinct(throttle, 10, source=HOME, prefix="home")
    assert throttle.locked("alice", HOME) == 60


def test_success_clears_the_familiar_counter(throttle):
    throttle.succeeded("alice", HOME)
    fail_distinct(throttle, 9, source=HOME)
    throttle.succeeded("alice", HOME)
    assert throttle.failed("alice", HOME, "x") is False
    assert throttle.locked("alice", HOME) == 0


def test_accounts_are_counted_apart(throttle):
    fail_distinct(throttle, 10, account="alice")
    assert throttle.locked("alice", ATTACKER) == 60
    assert throttle.locked("bob", ATTACKER) == 0


def test_source_delays_double_from_two_seconds_to_fifteen(throttle, clock):
    delays = [throttle.failure_delay(ATTACKER) for _ in range(6)]
    assert delays == [2, 4, 8, 15, 15, 15]
    assert throttle.failure_delay("203.0.113.9") == 2
    clock.advance(901)
    assert throttle.failure_delay(ATTACKER) == 2


def test_ipv6_sources_are_counted_per_48(throttle):
    assert throttle.failure_delay("2001:db8:1:1::1") == 2
    assert throttle.failure_delay("2001:db8:1:ffff::2") == 4
    assert throttle.failure_delay("2001:db8:2::1") == 2
    assert throttle.failure_delay("::ffff:192.0.2.1") == 2
    assert throttle.failure_delay("192.0.2.1") == 4


def test_trusted_networks_are_exempt(clock):
    config = ThrottleConfig(trusted_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    throttle = Throttle(config, clock.seconds)
    assert [throttle.failure_delay("10.1.2.3") for _ in range(3)] == [0, 0, 0]
    assert fail_distinct(throttle, 20, source="10.1.2.3") == [False] * 20
    assert throttle.locked("alice", "10.1.2.3") == 0


def test_thresholds_are_configurable(clock):
    config = ThrottleConfig(account_failures=3, lockout=5, lockout_max=7, source_delay=0.5,
                            source_delay_max=1, ignore_repeats=0)
    throttle = Throttle(config, clock.seconds)
    assert throttle.failed("a", ATTACKER, "x") is False
    assert throttle.failed("a", ATTACKER, "x") is False  # repeats count as one distinct
    assert throttle.failed("a", ATTACKER, "y") is False
    assert throttle.failed("a", ATTACKER, "z") is True
    assert throttle.locked("a", ATTACKER) == 5
    assert [throttle.failure_delay(ATTACKER) for _ in range(3)] == [0.5, 1, 1]


def test_digests_are_keyed_per_process(clock):
    one = Throttle(ThrottleConfig(), clock.seconds)
    two = Throttle(ThrottleConfig(), clock.seconds)
    assert one.digest("alice", "secret") != two.digest("alice", "secret")
    assert b"secret" not in one.digest("alice", "secret")


def test_a_success_elsewhere_leaves_the_familiar_counter_alone(throttle):
    throttle.succeeded("alice", HOME)
    fail_distinct(throttle, 9, source=HOME)
    throttle.succeeded("alice", ATTACKER)  # a new place becomes familiar...
    assert throttle.failed("alice", HOME, "tenth") is True  # ...home's count goes on


def test_only_secrets_the_directory_refused_are_skipped_next_time(throttle):
    throttle.failed("alice", HOME, "not-checked")
    assert not throttle.recently_failed("alice", HOME, "not-checked")
    throttle.failed("alice", HOME, "stale", upstream=True)
    assert throttle.recently_failed("alice", HOME, "stale")
    assert not throttle.recently_failed("alice", HOME, "other")
    assert not throttle.recently_failed("bob", HOME, "stale")


def test_checks_under_way_count_before_their_answer(throttle):
    """Forty guesses at once: no more reach the directory than the lockout
    allows one after another."""
    reservations = [throttle.reserve("alice", ATTACKER, f"guess{i}") for i in range(40)]
    granted = [r for r in reservations if r is not None]
    assert len(granted) == 10
    # The same secret again is one guess, not another.
    again = throttle.reserve("alice", ATTACKER, "guess0")
    assert again is not None
    again.release()
    for i, reservation in enumerate(granted):
        throttle.failed("alice", ATTACKER, f"guess{i}", upstream=True)
        reservation.release()
    assert throttle.locked("alice", ATTACKER)
    assert throttle.reserve("alice", ATTACKER, "another") is None


def test_released_checks_make_room(throttle):
    first = [throttle.reserve("alice", ATTACKER, f"g{i}") for i in range(10)]
    assert throttle.reserve("alice", ATTACKER, "g10") is None
    first[0].release()  # that one was right after all
    assert throttle.reserve("alice", ATTACKER, "g10") is not None


def test_trusted_sources_reserve_freely(clock):
    throttle = Throttle(ThrottleConfig(trusted_networks=(ipaddress.ip_network("10.0.0.0/8"),)),
                        clock.seconds)
    assert all(throttle.reserve("alice", "10.1.2.3", f"g{i}") for i in range(50))


def test_a_check_that_must_run_alone(throttle):
    with throttle.alone("alice") as first:
        assert first
        with throttle.alone("alice") as second:
            assert not second  # held back while the first runs
        with throttle.alone("bob") as other:
            assert other
    with throttle.alone("alice") as again:
        assert again


def test_the_help_desk_lists_locked_accounts_until_they_are_unlocked_or_the_lockout_ends(
        throttle, clock):
    assert throttle.locked_accounts() == []
    fail_distinct(throttle, 10, account="alice")
    fail_distinct(throttle, 10, account="unknown:mallory")  # a name with no account: never listed
    clock.advance(10)
    fail_distinct(throttle, 10, account="bob")
    assert throttle.locked_accounts() == [("bob", 60), ("alice", 50)]
    throttle.forget("bob")
    assert throttle.locked_accounts() == [("alice", 50)]
    clock.advance(50)
    assert throttle.locked_accounts() == []
    throttle.impose("carol", False, clock.seconds() + 30)  # decided by another process
    assert throttle.locked_accounts() == [("carol", 30)]


def test_app_password_creations_are_paced_per_actor(throttle, clock):
    assert all(throttle.may_create("portal:alice") for _ in range(10))
    assert not throttle.may_create("portal:alice")
    assert throttle.may_create("portal:bob")  # each actor their own
    clock.advance(59)
    assert not throttle.may_create("portal:alice")  # a refusal is not counted, nor lets one through
    clock.advance(1)
    assert throttle.may_create("portal:alice")


def test_the_help_desk_lists_accounts_not_places_nor_names_with_no_account(throttle, clock):
    throttle.succeeded("alice", HOME)
    fail_distinct(throttle, 10, account="alice")  # elsewhere...
    fail_distinct(throttle, 10, source=HOME, account="alice")  # ...and at home: one account
    fail_distinct(throttle, 10, account="unknown:mallory")  # no account: not one of them
    throttle.impose("unknown:trudy", False, clock.seconds() + 30)
    assert throttle.locked_accounts() == [("alice", 60)]
    clock.advance(60)
    assert throttle.locked_accounts() == []


def test_guesses_that_fill_a_new_familiar_place_lock_it_and_list_the_account(throttle):
    throttle.succeeded("alice", HOME)
    fail_distinct(throttle, 5, source=HOME, prefix="home")
    since = throttle.reserve("alice", ATTACKER, "right").order
    fail_distinct(throttle, 5, source=ATTACKER)  # guesses beside the sign-in...
    throttle.succeeded("alice", ATTACKER, since)  # ...go with the place it makes familiar
    assert throttle.locked("alice", ATTACKER) == 60
    assert throttle.locked_accounts() == [("alice", 60)]


def test_expired_lockouts_go_even_when_nobody_reads_the_list(throttle, clock):
    for i in range(5000):
        fail_distinct(throttle, 10, account=f"user{i}")
        clock.advance(1)  # each lockout over a minute later
    assert len(throttle._locked) < 2 * 1024  # noqa: SLF001 (what is kept, not what is said)
    assert len(throttle.locked_accounts()) == 59  # those of the last minute


def test_the_list_is_pruned_less_often_as_more_accounts_stay_locked(throttle, monkeypatch):
    prunes = []
    prune = throttle._prune  # noqa: SLF001
    monkeypatch.setattr(throttle, "_prune", lambda now: (prunes.append(now), prune(now)))
    for i in range(5000):  # all locked at once: nothing to prune
        fail_distinct(throttle, 10, account=f"user{i}")
    assert len(prunes) == 3  # at 1,024, 2,048 and 4,096 entries, not at every lockout after
    assert len(throttle.locked_accounts()) == 5000


def test_a_lockout_lifted_after_its_counts_were_let_go_leaves_the_list(clock, monkeypatch):
    monkeypatch.setattr("proxy.auth.throttle.MAX_TRACKED", 2)
    throttle = Throttle(ThrottleConfig(), clock.seconds)
    fail_distinct(throttle, 10, account="alice")
    fail_distinct(throttle, 1, account="bob")
    fail_distinct(throttle, 1, account="carol")  # alice's counts are let go (the least recent)
    throttle.forget("alice")  # the help desk lifts her lockout
    assert throttle.locked_accounts() == []


def test_a_lockout_imposed_by_another_process_is_not_shortened_here(throttle, clock):
    reservations = [throttle.reserve("alice", ATTACKER, f"guess{i}") for i in range(10)]
    throttle.impose("alice", False, clock.seconds() + 900)  # 15 minutes, from the store
    for i, reservation in enumerate(reservations):  # checks begun before it end now
        throttle.failed("alice", ATTACKER, f"guess{i}")
        reservation.release()
    assert throttle.locked("alice", ATTACKER) == 900


def test_a_name_tried_once_costs_little_memory(throttle):
    """Each name tried is kept (up to 200,000 of those with no account):
    what one costs bounds what a spray of names can take."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(2000):
            throttle.reserve(f"unknown:n{i}", ATTACKER, "guess").release()
            throttle.failed(f"unknown:n{i}", ATTACKER, "guess")
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown / 2000 < 2500  # bytes; 4,400 with a deque for each list of digests
