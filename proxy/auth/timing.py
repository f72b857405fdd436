"""How long an answer takes must not tell who exists.

A wrong password of a real account is checked by the directory; a name
that matches no account, or a refusal decided before any check (a primary
password where an app password is needed, a repeat of a recent wrong
secret), has nothing to check and would be answered sooner: from a source
with no failure delay (``throttle.trusted_networks``), a way to tell which
names are accounts. Such a refusal is held until a check would have ended:
for as long as a refusal after a real check took, drawn from the latest
ones, so that both kinds of answer come from one distribution of times.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

from twisted.internet.task import deferLater

from proxy.auth import Attempt, Decision, Reason
from proxy.auth.throttle import Throttle

SAMPLES = 128
# The event loop's timers fire in whole milliseconds, rounded up (epoll's
# timeout): a held answer waits by timer until this long before it is due,
# then turn by turn, other work going on meanwhile, until it is.
TIMER_GRAIN = 0.001


class CheckTime:
    """The times of the latest refusals that a directory check decided."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._times: deque[float] = deque(maxlen=SAMPLES)
        self._random = rng or random.Random()

    def hold(self, decision: Decision, elapsed: float) -> float:
        """How long after it began a refusal is answered, at the soonest
        (``elapsed``: how long deciding it took)."""
        if decision.checked:
            if decision.reason is Reason.WRONG_SECRET:
                self._times.append(elapsed)
            return 0.0
        if decision.reason is Reason.LOCKED_OUT or not self._times:
            return 0.0  # a lockout is answered at once for every name alike
        return self._random.choice(self._times)

    async def wait(self, clock: Any, seconds: float) -> None:
        """Wait ``seconds``, to within a turn of the event loop. A timer
        alone would fire up to a millisecond late, by where its wait fell
        between two whole milliseconds: held answers' times would then be
        spread wider than checked ones' and told apart from them by a rank
        test. The last millisecond's turns cost a held refusal about 0.3 ms
        of CPU, paid only where no failure delay of the source's is longer."""
        due = clock.seconds() + seconds
        if seconds > TIMER_GRAIN:
            await deferLater(clock, seconds - TIMER_GRAIN)
        last = None
        while (now := clock.seconds()) < due:
            # A clock that did not move in a turn (a test's) waits the rest by timer.
            await deferLater(clock, 0 if now != last else due - now)
            last = now


class FailureDelay:
    """The one failure delay: a refusal is answered no sooner than the
    source's delay (the throttle's) after the attempt began, and one that no
    directory check decided no sooner than a check would have ended."""

    def __init__(self, clock: Any, throttle: Throttle, check_time: CheckTime | None = None) -> None:
        self._clock = clock
        self._throttle = throttle
        self._check_time = check_time or CheckTime()

    async def hold(self, attempt: Attempt, decision: Decision, started: float) -> None:
        """Wait until ``decision``, refused, may be answered (``started``:
        when the attempt began)."""
        now = self._clock.seconds()
        delay = self._throttle.failure_delay(attempt.client_address)
        hold = self._check_time.hold(decision, now - started)
        if hold > delay:
            await self._check_time.wait(self._clock, started + hold - now)
        elif started + delay > now:
            await deferLater(self._clock, started + delay - now)
