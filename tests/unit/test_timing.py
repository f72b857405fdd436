"""Refusals with nothing checked are held as long as a checked one took."""

from __future__ import annotations

import random

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from proxy.auth import Attempt, Decision, Reason
from proxy.config import ThrottleConfig
from proxy.auth.timing import TIMER_GRAIN, CheckTime, LookupTime, name_form, wait
from tests.unit.fakes import PEOPLE, Core

PRIMARY = "Primary-Passw0rd"


def answered_at(core, attempt, seconds):
    """The decision on ``attempt``, answered when ``seconds`` of the clock
    have passed and not before."""
    decided = ensureDeferred(core.auth.authenticate(attempt))
    core.clock.advance(seconds - 0.1)
    assert not decided.called
    core.clock.advance(0.2)
    return decided.result


def test_held_for_a_time_drawn_from_checked_refusals():
    """A refusal no check decided, not at the directory's door (an app
    password used outside its scope), waits as long as a whole checked
    refusal took, drawn from the latest; a lockout is answered at once."""
    timing = CheckTime(random.Random(1))
    inactive = Decision(Reason.OUT_OF_SCOPE, "alice")
    assert timing.hold(inactive, 0.001) == 0.0  # nothing measured yet
    for elapsed in (0.010, 0.012, 0.014):
        timing.refused(elapsed - 0.005)
        assert timing.hold(Decision(Reason.WRONG_SECRET, "alice", checked=True), elapsed) == 0
    assert {timing.hold(inactive, 0.001) for _ in range(50)} == {0.010, 0.012, 0.014}
    assert timing.hold(Decision(Reason.LOCKED_OUT, "nobody"), 0.001) == 0.0
    # A stand-in's lockout still waits what its look-up owes.
    assert timing.hold(Decision(Reason.LOCKED_OUT, "nobody", owed=0.003), 0.001) == 0.004


def gated(core, name, secret, lookup, check=0.0):
    """An IMAP sign-in on a cloud listener whose look-up takes ``lookup``
    seconds of the clock and whose directory check then takes ``check``."""
    core.directory.lookup_gate, core.directory.gate = Deferred(), Deferred()
    decided = ensureDeferred(core.auth.authenticate(Attempt(
        protocol="imap", realm="cloud", username=name, secret=secret,
        client_address="192.0.2.1", tls=True)))
    core.clock.advance(lookup)
    core.directory.lookup_gate.callback(None)
    core.clock.advance(check)
    core.directory.gate.callback(None)
    core.directory.lookup_gate = core.directory.gate = None
    return decided


def test_an_unknown_name_is_answered_when_a_check_would_have_ended(tmp_path):
    """On a clock: a wrong password checked by the directory in 5 s of the
    clock; an unknown name then waits as long."""
    core = Core(tmp_path)
    core.build()
    core.directory.add("alice", PRIMARY)
    core.directory.gate = gate = Deferred()

    def attempt(name):
        return Attempt(protocol="ldap", realm="on-premises", username=name, secret="wrong",
                       client_address="192.0.2.1", tls=True)

    known = ensureDeferred(core.auth.authenticate(attempt("alice")))
    core.clock.advance(5)
    gate.callback(None)
    core.directory.gate = None
    assert known.result.reason is Reason.WRONG_SECRET
    assert answered_at(core, attempt("nobody"), 5).reason is Reason.UNKNOWN_USER


def test_a_wait_ends_by_timer_then_turn_by_turn_when_due():
    clock = Clock()
    d = ensureDeferred(wait(clock, 0.010))
    clock.advance(0.010 - TIMER_GRAIN)  # the timer: a millisecond early at most
    assert not d.called
    for _ in range(3):
        clock.advance(0)  # turns of the event loop, not yet due
        assert not d.called
    clock.advance(TIMER_GRAIN)
    assert d.called


def test_a_refusal_at_the_directorys_door_waits_what_the_check_itself_takes():
    """A refusal decided where a wrong password meets the directory, after
    the same steps (a name with no account with a stand-in), waits its own
    steps plus a check's time, not a whole checked refusal's: the later of
    those two would be later than either. Any other waits a whole one's."""
    timing = CheckTime(random.Random(1))
    timing.hold(Decision(Reason.WRONG_SECRET, "alice", checked=True), 0.010)
    mfa, repeat = Decision(Reason.MFA_REQUIRED, "eve"), Decision(Reason.WRONG_SECRET, "alice")
    assert timing.hold(mfa, 0.008) == 0.008  # no check's own time measured yet
    timing.refused(0.003)
    assert timing.hold(mfa, 0.008) == 0.011
    assert timing.hold(repeat, 0.007) == 0.010
    assert timing.hold(Decision(Reason.UNKNOWN_USER, "nobody"), 0.001) == 0.004
    # Refused whatever the secret, after the same steps with a stand-in; and
    # a token naming another's account, decided right after the look-up as
    # a token naming no account is.
    for reason in (Reason.ACCOUNT_INACTIVE, Reason.LEGACY_BLOCKED,
                   Reason.TOKEN_FOR_ANOTHER_USER):
        assert timing.hold(Decision(reason, "bob"), 0.001) == 0.004
    assert timing.hold(Decision(Reason.OUT_OF_SCOPE, "alice"), 0.001) == 0.010


def test_a_primary_password_where_an_app_password_is_needed_waits_for_a_check(tmp_path):
    """On a clock: a wrong password's look-up takes 1 s and the directory's
    check 2 s; the refusal of an MFA user's primary password, at the same
    door after a 3 s look-up, then waits the check's 2 s: 5 s in all, not
    the 3 s a whole checked refusal took."""
    core = Core(tmp_path)
    core.build()
    core.directory.add("alice", PRIMARY)
    core.directory.add("eve", PRIMARY, mfa_enforced=True)

    assert gated(core, "alice", "wrong", 1, 2).result.reason is Reason.WRONG_SECRET
    refused = gated(core, "eve", PRIMARY, 3)
    core.clock.advance(1.9)
    assert not refused.called
    core.clock.advance(0.2)
    assert refused.result.reason is Reason.MFA_REQUIRED


def test_an_account_refused_whatever_the_secret_is_answered_and_locked_as_an_unknown_name(
        tmp_path):
    """On a clock, with the account cache on: the directory reads an entry
    in 3 s and checks a wrong password in 2 s; alice's account is cached, so
    her wrong password takes 2 s in all. An account the directory says is
    not active, and one allowed modern authentication only, looked up for
    the first time, are refused right after their 3 s look-up: they then
    wait the check's 2 s as a name with no account does, not as long as a
    whole checked refusal of a cached account (answered at once, 3 s in).
    They go its steps, counted under the name as typed: locked out after as
    many guesses as an unknown name is."""
    core = Core(tmp_path)
    core.build(throttle=ThrottleConfig(account_failures=3, source_delay=0, source_delay_max=0),
               account_cache=30.0)
    core.directory.add("alice", PRIMARY)
    assert ensureDeferred(core.auth.account("alice")).result is not None
    core.directory.add("gone", PRIMARY)
    core.directory.change("gone", active=False)
    core.directory.add("old", PRIMARY, modern_auth_only=True)

    assert gated(core, "alice", "wrong", 0, 2).result.reason is Reason.WRONG_SECRET
    for name, reason in (("gone", Reason.ACCOUNT_INACTIVE), ("old", Reason.LEGACY_BLOCKED)):
        refused = gated(core, name, PRIMARY, 3)
        core.clock.advance(1.9)
        assert not refused.called
        core.clock.advance(0.2)
        assert refused.result.reason is reason
    for i in range(2):
        guess = gated(core, "gone", f"Guess-{i}", 3)
        core.clock.advance(3)
        assert guess.result.reason is Reason.ACCOUNT_INACTIVE
    assert gated(core, "gone", PRIMARY, 3).result.reason is Reason.LOCKED_OUT


def test_a_look_up_that_finds_no_account_takes_as_long_as_one_that_found_one(tmp_path):
    """On a clock: the directory reads alice's entry in 3 s and checks her
    wrong password in 2 s; it finds no "nobody" at once, whose refusal then
    waits the look-up's 3 s it did not take and the check's 2 s."""
    core = Core(tmp_path)
    core.build()
    core.directory.add("alice", PRIMARY)

    def attempt(name):
        return Attempt(protocol="ldap", realm="on-premises", username=name, secret="wrong",
                       client_address="192.0.2.1", tls=True)

    core.directory.lookup_gate, core.directory.gate = Deferred(), Deferred()
    known = ensureDeferred(core.auth.authenticate(attempt("alice")))
    core.clock.advance(3)
    core.directory.lookup_gate.callback(None)
    core.clock.advance(2)
    core.directory.gate.callback(None)
    core.directory.lookup_gate = core.directory.gate = None
    assert known.result.reason is Reason.WRONG_SECRET
    assert answered_at(core, attempt("nobody"), 5).reason is Reason.UNKNOWN_USER


def test_a_name_with_no_account_also_waits_the_shared_stores_count_it_never_made():
    """With failures counted in a shared store, a real account's guess costs
    a round trip there before its check; a name with no account has no DN to
    count it under, and owes one drawn from the latest (the decision adds it
    for a source whose guesses are counted: Authenticator._decide)."""
    timing = CheckTime(random.Random(1))
    assert timing.reservation() == 0.0
    timing.hold(Decision(Reason.WRONG_SECRET, "alice", checked=True), 0.010)
    timing.refused(0.003)
    timing.reserved(0.002)
    owed = timing.reservation()
    assert owed == 0.002
    assert timing.hold(Decision(Reason.UNKNOWN_USER, "nobody", owed=owed), 0.001) == 0.006
    assert timing.hold(Decision(Reason.MFA_REQUIRED, "eve"), 0.008) == 0.011  # it made the trip


def test_a_source_with_a_longer_failure_delay_waits_it_alone(tmp_path):
    """A failure delay longer than a check covers both kinds alike: "nobody",
    whose look-up found nothing at once where alice's took 3 s, is answered
    when the 5 s delay ends, as alice's wrong password was."""
    core = Core(tmp_path)
    core.build(throttle=ThrottleConfig(source_delay=5, source_delay_max=5))
    core.directory.add("alice", PRIMARY)

    def attempt(name, address):
        return Attempt(protocol="ldap", realm="on-premises", username=name, secret="wrong",
                       client_address=address, tls=True)

    core.directory.lookup_gate = Deferred()
    known = ensureDeferred(core.auth.authenticate(attempt("alice", "192.0.2.1")))
    core.clock.advance(3)
    core.directory.lookup_gate.callback(None)
    core.directory.lookup_gate = None
    core.clock.advance(1.9)
    assert not known.called
    core.clock.advance(0.2)
    assert known.result.reason is Reason.WRONG_SECRET
    assert answered_at(core, attempt("nobody", "192.0.2.2"), 5).reason is Reason.UNKNOWN_USER


def test_with_the_account_cache_answers_from_memory_are_neither_held_nor_drawn_from(tmp_path):
    """A name's look-up answered from the account cache asked nothing: a
    cached "no account" is not held, and cached accounts' look-ups (no time
    at all) are not among those a missing one is held to."""
    core = Core(tmp_path)
    core.build(account_cache=60.0)
    core.directory.add("alice", PRIMARY)

    def attempt(name, secret):
        return Attempt(protocol="ldap", realm="on-premises", username=name, secret=secret,
                       client_address="192.0.2.1", tls=True)

    core.directory.lookup_gate = Deferred()
    ensureDeferred(core.auth.authenticate(attempt("alice", "wrong-0")))
    core.clock.advance(3)
    core.directory.lookup_gate.callback(None)
    core.directory.lookup_gate = None
    for i in range(1, 20):  # alice from the cache: no look-up timed
        assert ensureDeferred(core.auth.authenticate(attempt("alice", f"wrong-{i}"))).called
    first = ensureDeferred(core.auth.authenticate(attempt("nobody", "wrong")))
    core.clock.advance(2.9)
    assert not first.called  # owes alice's one timed look-up: 3 s (her check took none)
    core.clock.advance(0.2)
    assert first.called
    again = ensureDeferred(core.auth.authenticate(attempt("nobody", "wrong-again")))
    assert again.called  # "no account", from the cache: nothing to hold


def test_a_missing_name_owes_a_look_up_of_a_name_of_its_own_form(tmp_path):
    """On a clock: the directory finds alice by user name in 1 s, and by DN
    (her entry, then found again by her name) in 3 s. A DN that matches no
    account then owes the 3 s, a user name the 1 s, however many of the
    other form were looked up meanwhile."""
    core = Core(tmp_path)
    core.build()
    core.directory.add("alice", PRIMARY)
    for i in range(5):
        gated(core, "alice", f"wrong-{i}", 1)
    gated(core, f"uid=alice,{PEOPLE}", "wrong", 3)
    for i in range(3):
        missing = gated(core, f"uid=nobody{i},{PEOPLE}", "wrong", 0)
        core.clock.advance(2.9)
        assert not missing.called
        core.clock.advance(0.2)
        assert missing.result.reason is Reason.UNKNOWN_USER
    missing = gated(core, "nobody", "wrong", 0)
    core.clock.advance(1.1)
    assert missing.result.reason is Reason.UNKNOWN_USER


def test_look_up_times_are_drawn_by_the_form_of_the_name():
    times = LookupTime(random.Random(1))
    assert times.owed(0.001, "dn") == 0.0  # nothing measured yet
    times.found(0.004, "name")
    assert times.owed(0.001, "dn") == 0.003  # none of its own form yet: any
    times.found(0.009, "dn")
    assert {times.owed(0.001, "dn") for _ in range(20)} == {0.008}
    assert {times.owed(0.001, "name") for _ in range(20)} == {0.003}
    assert [name_form(n) for n in ("alice", "alice@example.test", "uid=alice,ou=people")] \
        == ["name", "name", "dn"]
