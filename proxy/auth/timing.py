"""How long an answer takes must not tell who exists.

A wrong password of a real account is checked by the directory; a name
that matches no account, or a refusal decided before any check (a primary
password where an app password is needed, a repeat of a recent wrong
secret), has nothing to check and would be answered sooner: from a source
with no failure delay (``throttle.trusted_networks``), a way to tell which
names are accounts. So each step that a real account's wrong password takes
and such a refusal does not is made to take as long, drawn from the latest
real ones:

- a look-up that finds no account owes the time one that found one took,
  of a name of the same form (:class:`LookupTime`, ``Decision.owed``): the
  directory reads a real entry and its groups, and finds nothing sooner;
- a refusal stopped where a wrong password meets the directory, after the
  same steps up to there (a name with no account, or an account refused
  whatever the secret, which go them with a stand-in; a primary password
  where an app password is needed; a repeat of a recent wrong secret) waits
  what it owes and what the directory's check itself takes, at its end: one
  wait, as each ends up to a turn of the event loop late;
- any other refusal (an app password used outside its scope, say) is
  answered no sooner than a whole refusal after a real check took.

Each step is timed as it was gone, so a directory or a host that grows
slower or faster moves both kinds alike. Holding the second kind as long as
a whole check, as the third is, made it later than the checks it is timed
beside: its own steps, nearly a check's length, and the drawn time, each as
likely the longer (the later of two, on average later than either).
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

from twisted.internet.task import deferLater

from proxy.auth import Attempt, Decision, Reason
from proxy.auth.throttle import Throttle

SAMPLES = 128
# Refusals decided where a wrong password meets the directory, having gone
# every step a real account's wrong password goes up to there: a name with
# no account, and an account refused whatever the secret (not active, or
# allowed modern authentication only), go them with a stand-in
# (Authenticator._stood_in). A sign-in with an access token checks nothing:
# its refusals of a name (none, another's, refused anyway) all come right
# after the look-up.
AT_THE_DIRECTORY = frozenset({
    Reason.MFA_REQUIRED, Reason.WRONG_SECRET, Reason.UNKNOWN_USER, Reason.ACCOUNT_INACTIVE,
    Reason.LEGACY_BLOCKED, Reason.TOKEN_FOR_ANOTHER_USER})
# The event loop's timers fire in whole milliseconds, rounded up (epoll's
# timeout): a held answer waits by timer until this long before it is due,
# then turn by turn, other work going on meanwhile, until it is.
TIMER_GRAIN = 0.001


async def wait(clock: Any, seconds: float) -> None:
    """Wait ``seconds``, to within a turn of the event loop. A timer alone
    would fire up to a millisecond late, by where its wait fell between two
    whole milliseconds: held answers' times would then be spread wider than
    checked ones' and told apart from them by a rank test. The last
    millisecond's turns cost a held refusal about 0.3 ms of CPU, paid only
    where no failure delay of the source's is longer."""
    due = clock.seconds() + seconds
    if seconds > TIMER_GRAIN:
        await deferLater(clock, seconds - TIMER_GRAIN)
    last = None
    while (now := clock.seconds()) < due:
        # A clock that did not move in a turn (a test's) waits the rest by timer.
        await deferLater(clock, 0 if now != last else due - now)
        last = now


def name_form(name: str) -> str:
    """Which of the directory's look-ups a name as typed takes: a DN (``=``
    in it) is read as that entry and then found again by its user name, two
    searches where a user name or mail address takes one. A name of another
    form in one of them is so for a real account and a missing one alike."""
    return "dn" if "=" in name else "name"


class LookupTime:
    """How long the directory took to find an account, of the latest look-ups
    that found one, by the form of the name (:func:`name_form`): a refusal
    after one that found none waits the rest of one of the same form."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._times: dict[str, deque[float]] = {}
        self._random = rng or random.Random()

    def found(self, seconds: float, form: str = "name") -> None:
        times = self._times.get(form)
        if times is None:
            times = self._times[form] = deque(maxlen=SAMPLES)
        times.append(seconds)

    def owed(self, seconds: float, form: str = "name") -> float:
        """A look-up found no account in ``seconds``: how much longer one
        that found one would have taken, drawn from the latest of the same
        form (of any, while there is none of it yet)."""
        times = self._times.get(form) or next((t for t in self._times.values() if t), None)
        if not times:
            return 0.0
        return max(self._random.choice(times) - seconds, 0.0)


class CheckTime:
    """The times of the latest refusals that a directory check decided,
    whole and of the check alone."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._times: deque[float] = deque(maxlen=SAMPLES)
        self._checks: deque[float] = deque(maxlen=SAMPLES)
        self._reserves: deque[float] = deque(maxlen=SAMPLES)
        self._random = rng or random.Random()

    def refused(self, seconds: float) -> None:
        """The directory refused a password, its check taking ``seconds``."""
        self._checks.append(seconds)

    def reserved(self, seconds: float) -> None:
        """A real account's guess was counted in the shared store (the
        fleet's), a round trip of ``seconds`` that a name with no account,
        having no DN to count it under, does not make."""
        self._reserves.append(seconds)

    def reservation(self) -> float:
        """The time of one of the latest such round trips (0: none made)."""
        return self._random.choice(self._reserves) if self._reserves else 0.0

    def hold(self, decision: Decision, elapsed: float) -> float:
        """How long after it began a refusal is answered, at the soonest
        (``elapsed``: how long deciding it took)."""
        if decision.checked:
            if decision.reason is Reason.WRONG_SECRET:
                self._times.append(elapsed)
            return 0.0
        if decision.reason is Reason.LOCKED_OUT:
            # Answered at once for every name alike, but for what a name with
            # no account owes for its look-up.
            return elapsed + decision.owed if decision.owed else 0.0
        if decision.reason in AT_THE_DIRECTORY:
            check = self._random.choice(self._checks) if self._checks else 0.0
            return elapsed + check + decision.owed
        if not self._times:
            return 0.0
        return self._random.choice(self._times)


class FailureDelay:
    """The one failure delay: a refusal is answered no sooner than the
    source's delay (the throttle's) after the attempt began, and one that no
    directory check decided no sooner than a check would have ended."""

    def __init__(self, clock: Any, throttle: Throttle, check_time: CheckTime) -> None:
        self._clock = clock
        self._throttle = throttle
        self._check_time = check_time

    async def hold(self, attempt: Attempt, decision: Decision, started: float) -> None:
        """Wait until ``decision``, refused, may be answered (``started``:
        when the attempt began)."""
        now = self._clock.seconds()
        delay = self._throttle.failure_delay(attempt.client_address)
        hold = self._check_time.hold(decision, now - started)
        if hold > delay:
            await wait(self._clock, started + hold - now)
        elif started + delay > now:
            await deferLater(self._clock, started + delay - now)
