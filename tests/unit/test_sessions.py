"""The session registry: what ends live sessions, on a task.Clock."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet.defer import ensureDeferred

from proxy.sessions import Sessions
from tests.unit.fakes import Core

PRIMARY = "Primary-Passw0rd"


@attrs.define(eq=False)
class Session:
    username: str
    dn: str
    app_password_id: str | None = None
    app_password_created_at: float | None = None
    password_changed_at: float | None = None
    ended: list = attrs.Factory(list)

    def revoke(self, reason):
        self.ended.append(reason)


@pytest.fixture
def core(tmp_path):
    core = Core(tmp_path)
    core.build()
    core.sessions = Sessions(core.clock, core.directory, 1.0, core.auth)
    core.auth.sessions = core.sessions.registry
    core.auth.on_revoked(core.sessions.revoked)
    return core


def session(core, uid, **kw):
    account = core.directory.accounts.get(uid) or core.directory.add(uid, PRIMARY)
    s = Session(uid, account.dn, password_changed_at=account.password_changed_at, **kw)
    core.sessions.add(s)
    return s


def check(core):
    ensureDeferred(core.sessions.check_accounts())


def test_an_inactive_deleted_or_modern_auth_only_account_ends_its_sessions(core):
    a, b, c, keep = (session(core, u) for u in ("a", "b", "c", "keep"))
    core.directory.change("a", active=False)
    del core.directory.accounts["b"]
    core.directory.change("c", modern_auth_only=True)
    check(core)
    assert (a.ended, b.ended, c.ended, keep.ended) == (
        ["account_inactive"], ["account_inactive"], ["legacy_blocked"], [])
    assert len(core.sessions) == 1


def test_a_password_change_ends_sessions_from_before_it(core):
    created = core.admin.create("alice", "phone")
    old_app = session(core, "alice", app_password_id=created.record.id,
                      app_password_created_at=created.record.created_at)
    old_primary = session(core, "alice")
    core.directory.change("alice", password_changed_at=5000.0)
    after = session(core, "alice")
    check(core)
    assert old_app.ended == ["password_change"] and old_primary.ended == ["password_change"]
    assert after.ended == []
    # Stopped, as the policy says, and listed with the reason.
    assert [a.stopped_reason for a in core.store.list_app_passwords("alice")] == ["password_change"]


def test_one_accounts_trouble_does_not_stop_the_others(core):
    broken, fine = session(core, "broken"), session(core, "fine")
    core.directory.change("fine", active=False)

    async def fail(account):
        raise RuntimeError("the store is locked")

    core.directory.change("broken", password_changed_at=1.0)
    broken.app_password_id = "x"
    core.auth.password_changed = fail
    check(core)
    assert fine.ended == ["account_inactive"]


def test_a_directory_outage_ends_nothing(core):
    s = session(core, "alice")
    core.directory.down = True
    check(core)
    assert s.ended == [] and len(core.sessions) == 1


def test_everyone_and_one_app_password(core):
    created = core.admin.create("alice", "phone")
    phone = session(core, "alice", app_password_id=created.record.id,
                    app_password_created_at=created.record.created_at)
    other = session(core, "alice", app_password_id="other")
    core.sessions.revoked("alice", created.record.id, "deleted")
    assert phone.ended == ["deleted"] and other.ended == []
    core.sessions.revoked("alice", None, "state_changed")
    assert other.ended == []  # a change of MFA state leaves open sessions alone
    assert core.sessions.end_all("legacy_blocked") == 1 and other.ended == ["legacy_blocked"]
