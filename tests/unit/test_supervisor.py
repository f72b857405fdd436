"""The supervisor of ``workers: N`` on task.Clock, with fake worker
processes: start and readiness, a dead worker started again after a delay
that doubles, giving up on one that dies in a loop, SIGHUP and SIGTERM
forwarded once, the watchdog; and the metrics of every worker summed."""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from proxy import config as configuration
from proxy.daemon.supervisor import (
    Backoff,
    Failed,
    Restarts,
    Supervisor,
    WorkerRole,
    summed,
)


class FakeProcess:
    def __init__(self, index: int, protocol) -> None:
        self.index = index
        self.protocol = protocol
        self.signals: list[str] = []
        self.ended = False

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise OSError("already exited")
        self.signals.append(name)

    def end(self, code: int | None = None, signal: int | None = None) -> None:
        self.ended = True
        self.protocol.processEnded(Failure(ProcessTerminated(exitCode=code, signal=signal)))


class Harness:
    def __init__(self, count: int = 2, watchdog: float | None = None,
                 backoff: Backoff = Backoff()) -> None:
        self.clock = Clock()
        self.spawned: list[FakeProcess] = []
        self.told: list[str] = []
        self.supervisor = Supervisor(
            clock=self.clock, count=count, spawn=self.spawn,
            restarts=Restarts(self.clock, backoff), notify=self.told.append,
            watchdog=watchdog, stop_timeout=30.0)

    def spawn(self, index: int, protocol) -> FakeProcess:
        process = FakeProcess(index, protocol)
        self.spawned.append(process)
        return process

    def current(self, index: int) -> FakeProcess:
        return [p for p in self.spawned if p.index == index][-1]

    def ready(self, index: int) -> None:
        self.supervisor.notified(index, b"READY=1")

    def started(self) -> Deferred:
        d = Deferred.fromCoroutine(self.supervisor.start())
        for i in range(len(self.supervisor.workers)):
            self.ready(i)
        assert d.called
        return d


def result(d: Deferred):
    out: list = []
    d.addBoth(out.append)
    assert out, "not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def start_failure(d: Deferred) -> int:
    """The exit code ``start()`` failed with."""
    try:
        result(d)
    except Failed as e:
        return e.code
    raise AssertionError("start did not fail")


def test_ready_when_every_worker_is():
    h = Harness(count=3)
    d = Deferred.fromCoroutine(h.supervisor.start())
    assert [p.index for p in h.spawned] == [0, 1, 2]
    h.ready(0)
    h.ready(2)
    assert not d.called and h.told == []
    h.ready(1)
    result(d)
    assert h.told == ["READY=1\nSTATUS=3 workers"]


def test_a_worker_that_cannot_start_stops_the_others_and_its_exit_code_is_the_supervisors():
    h = Harness(count=2)
    d = Deferred.fromCoroutine(h.supervisor.start())
    h.ready(1)
    h.current(0).end(code=78)  # the config or the state is wrong
    assert h.current(1).signals == ["TERM"]
    assert not d.called  # the other stops as it would alone
    h.current(1).end(code=0)
    assert start_failure(d) == 78
    assert len(h.spawned) == 2  # nothing started again
    assert result(h.supervisor.done) == 78


def test_a_dead_worker_is_started_again_after_a_delay_that_doubles():
    h = Harness(count=2, backoff=Backoff(first=0.5, most=30.0, window=120.0, limit=6))
    h.started()
    waits = []
    for _ in range(5):
        h.current(1).end(signal=9)
        before = len(h.spawned)
        waited = 0.0
        while len(h.spawned) == before:
            h.clock.advance(0.25)
            waited += 0.25
        waits.append(waited)
        h.ready(1)
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert h.supervisor.restarted == 5
    assert h.current(0).signals == []  # the others are left alone
    assert not h.supervisor.done.called


def test_deaths_long_apart_start_the_backoff_afresh():
    restarts = Restarts(clock := Clock(), Backoff(first=1.0, window=60.0, limit=3))
    assert restarts.died(0) == 1.0
    assert restarts.died(0) == 2.0
    clock.advance(61)
    assert restarts.died(0) == 1.0  # the old deaths are out of the window
    assert restarts.died(1) == 1.0  # each worker its own
    assert restarts.died(0) == 2.0
    assert restarts.died(0) is None  # three within the window: a loop


def test_a_worker_dying_in_a_loop_makes_the_supervisor_give_up_cleanly():
    h = Harness(count=2, backoff=Backoff(first=0.5, most=30.0, window=120.0, limit=3))
    h.started()
    h.current(0).end(code=1)
    h.clock.advance(0.5)
    h.current(0).end(code=1)
    h.clock.advance(1.0)
    spawned = len(h.spawned)
    h.current(0).end(code=1)  # the third within the window
    h.clock.advance(10)
    assert len(h.spawned) == spawned  # not started again
    assert h.current(1).signals == ["TERM"]  # the other told to stop, once
    assert "STOPPING=1" in h.told
    assert not h.supervisor.done.called
    h.current(1).end(code=0)
    assert result(h.supervisor.done) == 1  # systemd's Restart= takes over


def test_sighup_reaches_every_worker_once_and_systemd_hears_ready_when_all_reloaded():
    h = Harness(count=2)
    h.started()
    h.told.clear()
    d = Deferred.fromCoroutine(h.supervisor.reload())
    assert [h.current(i).signals for i in (0, 1)] == [["HUP"], ["HUP"]]
    assert h.told == ["RELOADING=1"]
    for i in (0, 1):
        h.supervisor.notified(i, b"RELOADING=1")
    h.ready(0)
    assert not d.called
    h.ready(1)
    result(d)
    assert h.told == ["RELOADING=1", "READY=1"]


def test_sigterm_reaches_every_worker_once_and_one_that_hangs_is_killed():
    h = Harness(count=3)
    h.started()
    h.current(2).end(signal=9)  # dead, waiting for its restart
    first = Deferred.fromCoroutine(h.supervisor.stop("SIGTERM received"))
    Deferred.fromCoroutine(h.supervisor.stop("SIGTERM received"))  # a second: nothing more
    assert [h.current(i).signals for i in (0, 1)] == [["TERM"], ["TERM"]]
    h.clock.advance(5)
    assert len(h.spawned) == 3  # the pending restart was cancelled
    h.current(0).end(code=0)
    h.clock.advance(25)  # 30 s after the stop began
    assert h.current(1).signals == ["TERM", "KILL"]
    h.current(1).end(signal=9)
    result(first)
    assert result(h.supervisor.done) == 0


def test_a_worker_whose_watchdog_pings_stop_is_killed_and_started_again():
    h = Harness(count=2, watchdog=10.0)
    h.started()
    for _ in range(4):
        h.clock.advance(4)
        h.supervisor.notified(0, b"WATCHDOG=1")
    assert h.current(1).signals == ["KILL"]  # silent for 16 s
    assert h.current(0).signals == []
    h.current(1).end(signal=9)
    h.clock.advance(0.5)
    assert len(h.spawned) == 3


def test_metrics_of_every_worker_are_summed():
    one = (
        "# TYPE legacy_auth_proxy_sign_ins counter\n"
        'legacy_auth_proxy_sign_ins_total{outcome="accepted"} 3\n'
        'legacy_auth_proxy_sign_ins_created{outcome="accepted"} 100\n'
        "# TYPE legacy_auth_proxy_ready gauge\nlegacy_auth_proxy_ready 1\n"
        "# TYPE legacy_auth_proxy_lockouts gauge\nlegacy_auth_proxy_lockouts 2\n"
        "# TYPE legacy_auth_proxy_decision_seconds histogram\n"
        'legacy_auth_proxy_decision_seconds_bucket{le="0.1"} 2\n'
        'legacy_auth_proxy_decision_seconds_bucket{le="+Inf"} 3\n'
        "legacy_auth_proxy_decision_seconds_count 3\nlegacy_auth_proxy_decision_seconds_sum 0.2\n"
    )
    two = (
        "# TYPE legacy_auth_proxy_sign_ins counter\n"
        'legacy_auth_proxy_sign_ins_total{outcome="accepted"} 4\n'
        'legacy_auth_proxy_sign_ins_total{outcome="refused"} 1\n'
        'legacy_auth_proxy_sign_ins_created{outcome="accepted"} 90\n'
        "# TYPE legacy_auth_proxy_ready gauge\nlegacy_auth_proxy_ready 0\n"
        "# TYPE legacy_auth_proxy_lockouts gauge\nlegacy_auth_proxy_lockouts 2\n"
        "# TYPE legacy_auth_proxy_decision_seconds histogram\n"
        'legacy_auth_proxy_decision_seconds_bucket{le="0.1"} 1\n'
        'legacy_auth_proxy_decision_seconds_bucket{le="+Inf"} 1\n'
        "legacy_auth_proxy_decision_seconds_count 1\nlegacy_auth_proxy_decision_seconds_sum 0.05\n"
    )
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in summed([one, two]) for s in family.samples}
    accepted = (("outcome", "accepted"),)
    assert samples[("legacy_auth_proxy_sign_ins_total", accepted)] == 7
    assert samples[("legacy_auth_proxy_sign_ins_total", (("outcome", "refused"),))] == 1
    assert samples[("legacy_auth_proxy_sign_ins_created", accepted)] == 90
    assert samples[("legacy_auth_proxy_ready", ())] == 0  # ready only if every worker is
    assert samples[("legacy_auth_proxy_lockouts", ())] == 2  # the same lockouts, from the store
    assert samples[("legacy_auth_proxy_decision_seconds_bucket", (("le", "+Inf"),))] == 4
    assert samples[("legacy_auth_proxy_decision_seconds_count", ())] == 4
    assert abs(samples[("legacy_auth_proxy_decision_seconds_sum", ())] - 0.25) < 1e-9


def test_a_workers_role_travels_in_its_environment_and_shapes_its_config(tmp_path):
    role = WorkerRole(index=1, supervisor=42, metrics="unix:/run/x/metrics-1.sock",
                      portal=False, sockets={"tcp:143": (7, 2)})
    assert WorkerRole.from_environment({"LEGACY_AUTH_PROXY_WORKER": role.to_environment()}) == role
    assert WorkerRole.from_environment({}) is None
    text = ("workers: 4\nmetrics:\n  endpoint: tcp:9464\n"
            "directory:\n  url: ldap://d\n  bind_dn: cn=p\n  bind_password_file: p\n"
            "  user_base: dc=x\nportal:\n  endpoint: tcp:8443\n  certificate: c\n"
            "  private_key: k\n")
    config = configuration.parse(text, tmp_path / "c.yaml")
    applied = role.applied(config)
    assert applied.workers == 4  # failures shared through the store
    assert applied.metrics.endpoint == "unix:/run/x/metrics-1.sock"
    assert applied.portal.endpoint is None  # worker 0's
    assert attrs.evolve(role, index=0, portal=True).applied(config).portal.endpoint == "tcp:8443"


def test_a_worker_still_starting_is_not_told_to_reload():
    h = Harness(count=2)
    h.started()
    h.current(1).end(signal=9)
    h.clock.advance(0.5)  # started again, not ready yet
    d = Deferred.fromCoroutine(h.supervisor.reload())
    assert h.current(0).signals == ["HUP"]
    assert h.current(1).signals == []  # it reads the config as it is now
    h.ready(0)
    result(d)
    h.ready(1)


def test_a_worker_that_cannot_be_spawned_is_tried_again_like_one_that_died():
    h = Harness(count=2)
    h.started()
    real = h.spawn
    failures = [OSError("EAGAIN")]

    def flaky(index, protocol):
        if failures:
            raise failures.pop()
        return real(index, protocol)

    h.supervisor._spawn = flaky
    h.current(1).end(signal=9)
    h.clock.advance(0.5)  # the first try fails: counted as a death
    assert len(h.spawned) == 2
    h.clock.advance(1.0)  # the next, a second later, starts it
    assert len(h.spawned) == 3 and h.current(1).index == 1


def test_a_worker_that_ends_before_its_spawn_returns_is_started_again_not_taken_as_running():
    """Twisted reaps a child that is already gone within spawnProcess, and
    tells its protocol before the call returns."""
    h = Harness(count=2, backoff=Backoff(first=0.5, most=30.0, window=120.0, limit=3))
    h.started()
    real = h.spawn
    early = [True]

    def gone_at_once(index, protocol):
        process = real(index, protocol)
        if early:
            early.pop()
            process.end(signal=9)
        return process

    h.supervisor._spawn = gone_at_once
    h.current(1).end(signal=9)
    h.clock.advance(0.5)  # started again, and gone before the call returned
    assert h.current(1).ended and h.supervisor.workers[1].process is None
    h.clock.advance(1.0)  # so it is started once more, after the doubled delay
    assert len(h.spawned) == 4 and not h.current(1).ended
    h.ready(1)
    assert h.supervisor.workers[1].process is h.current(1)
    Deferred.fromCoroutine(h.supervisor.stop("SIGTERM received"))
    h.current(0).end(code=0)
    h.current(1).end(code=0)
    assert result(h.supervisor.done) == 0  # nothing left counted as running


def test_a_worker_that_ends_as_the_first_start_spawns_it_stops_the_start_there():
    """Its end heard within the spawn (exit code 78: the config is wrong):
    the supervisor stops, and spawns none of the others after it."""
    h = Harness(count=3)

    def gone_at_once(index, protocol):
        process = FakeProcess(index, protocol)
        h.spawned.append(process)
        process.end(code=78)
        return process

    h.supervisor._spawn = gone_at_once
    d = Deferred.fromCoroutine(h.supervisor.start())
    assert len(h.spawned) == 1
    assert start_failure(d) == 78
    assert result(h.supervisor.done) == 78
