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


def test_a_proof_of_who_the_user_is_grows_stale_whatever_the_session_does():
    from proxy.portal.websessions import fresh

    clock = Clock()
    sessions = WebSessions(clock, idle=600, lifetime=3600)
    token, session = sessions.start("alice", "uid=alice", "signed_in")
    assert fresh(session, clock.seconds(), 300)  # a code at sign-in
    for _ in range(7):
        clock.advance(50)
        assert sessions.get(token) is session  # busy: the session lives on ...
    assert not fresh(session, clock.seconds(), 300)  # ... its proof does not
    # A provider's sign-in counts from its auth_time, not from now.
    _, late = sessions.start("bob", "uid=bob", "signed_in", method="oidc",
                             strong_at=clock.seconds() - 400)
    assert not fresh(late, clock.seconds(), 300)
    # A fresh check passed marks that session alone, and only its user's.
    key = sessions.key_of(token)
    assert sessions.proved(key, "bob", clock.seconds()) is None
    assert sessions.proved(key, "alice", clock.seconds()) is session
    assert fresh(session, clock.seconds(), 300)
    _, enrolling = sessions.start("carol", "uid=carol", "enrolling", pending_key="k")
    assert enrolling.strong_at is None and not fresh(enrolling, clock.seconds(), 300)


def test_a_user_ends_one_of_their_sessions_by_its_id_and_no_one_elses():
    """"Sign out that other browser": the id in the list names one session;
    it opens nothing, and it ends only its own user's session."""
    clock = Clock()
    sessions = WebSessions(clock, idle=60, lifetime=300)
    here, _ = sessions.start("alice", "uid=alice", "signed_in")
    there, other = sessions.start("alice", "uid=alice", "signed_in")
    bobs, bob = sessions.start("bob", "uid=bob", "signed_in")
    assert other.id not in (here, there) and sessions.get(other.id) is None
    assert sessions.end_one("alice", bob.id) is None and sessions.get(bobs) is bob
    assert sessions.end_one("alice", other.id) is other
    assert sessions.get(there) is None and sessions.get(here) is not None
    assert sessions.end_one("alice", other.id) is None  # gone already
    clock.advance(61)
    assert sessions.end_one("bob", bob.id) is None  # expired: nothing to end
