"""The session registry's periodic checks go on whatever the directory
does (issue #22: one look-up that never returned stopped them for good)."""

from __future__ import annotations

from types import SimpleNamespace

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from proxy.directory import Account
from proxy.sessions import Sessions


@attrs.define(eq=False)
class Session:
    username: str
    dn: str
    app_password_id: str | None = "ap1"
    app_password_created_at: float | None = None
    password_changed_at: float | None = None
    address: str = "192.0.2.1"
    ended: list = attrs.Factory(list)

    def revoke(self, reason):
        self.ended.append(reason)


class StuckOnce:
    """A directory whose first look-up never answers (a hand-off lost, a
    bug); afterwards the account is reported disabled."""

    config = SimpleNamespace(timeout=5.0)

    def __init__(self) -> None:
        self.calls = 0
        self.stuck: Deferred | None = None

    def resolve(self, dn):
        self.calls += 1
        if self.calls == 1:
            self.stuck = Deferred()
            return self.stuck
        return _inactive(dn)


async def _inactive(dn):
    return Account(dn=dn, username="alice", active=False)


def test_a_look_up_that_never_answers_does_not_stop_the_checks():
    clock = Clock()
    directory = StuckOnce()
    sessions = Sessions(clock, directory, 1.0)
    session = Session("alice", "uid=alice,ou=people,dc=example,dc=test")
    sessions.add(session)
    sessions.start()
    clock.advance(1.0)
    assert directory.calls == 1 and session.ended == []
    for _ in range(30):
        clock.advance(1.0)
    # Given up (and cancelled) after four of the directory's timeouts; the
    # next round found the account disabled and ended its session.
    assert directory.stuck is not None and directory.stuck.called
    assert session.ended == ["account_inactive"]
    assert len(sessions) == 0
    sessions.stop()
