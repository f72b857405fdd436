"""The portal's page sessions on a task.Clock: timeouts, tokens."""

from __future__ import annotations

from twisted.internet.task import Clock

from proxy.portal.websessions import WebSessions


def test_a_session_ends_when_idle_or_too_old():
    clock = Clock()
    sessions = WebSessions(clock, idle=60, lifetime=300)
    token, session = sessions.start("alice", "uid=alice", "signed_in")
    assert sessions.get(token) is session
    clock.advance(59)
    assert sessions.get(token) is session  # seen: idle starts over
    clock.advance(61)
    assert sessions.get(token) is None
    token, session = sessions.start("alice", "uid=alice", "signed_in")
    for _ in range(6):
        clock.advance(50)
        found = sessions.get(token)
    assert found is None  # 300 s after sign-in, however busy
    assert len(sessions) == 0


def test_tokens_are_random_and_kept_only_as_digests():
    sessions = WebSessions(Clock(), idle=60, lifetime=300)
    a, _ = sessions.start("alice", "uid=alice", "signed_in")
    b, _ = sessions.start("alice", "uid=alice", "signed_in")
    assert a != b and len(a) >= 43
    assert a not in repr(sessions._sessions)
    assert sessions.get(a + "x") is None and sessions.get("") is None and sessions.get(None) is None
    assert sessions.end_user("alice") == 2 and sessions.get(a) is None


def test_expire_forgets_old_sessions():
    clock = Clock()
    sessions = WebSessions(clock, idle=60, lifetime=300)
    sessions.start("alice", "uid=alice", "enrolling", pending_key="K")
    clock.advance(61)
    sessions.expire()
    assert len(sessions) == 0
