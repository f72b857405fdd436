import threading

import pytest
import pytest_twisted
from twisted.internet import reactor

from proxy.threads import Busy, Pool, Threaded


@pytest.fixture
def pool():
    p = Pool(reactor, "test", threads=1, queue=1)
    p.start()
    yield p
    p.stop()


@pytest_twisted.ensureDeferred
async def test_work_runs_off_the_reactor_thread(pool):
    main = threading.get_ident()
    assert await pool.submit(threading.get_ident) != main
    assert pool.pending == 0


@pytest_twisted.ensureDeferred
async def test_a_full_queue_answers_busy_at_once_and_frees_up(pool):
    gate = threading.Event()
    running = pool.submit(gate.wait, 10)
    waiting = pool.submit(lambda: "queued")
    with pytest.raises(Busy):
        await pool.submit(lambda: "refused")
    gate.set()
    assert await running is True
    assert await waiting == "queued"
    assert await pool.submit(lambda: "again") == "again"


@pytest_twisted.ensureDeferred
async def test_errors_reach_the_caller_and_free_the_slot(pool):
    with pytest.raises(ZeroDivisionError):
        await pool.submit(lambda: 1 / 0)
    assert pool.pending == 0


@pytest_twisted.ensureDeferred
async def test_threaded_wraps_every_method(pool):
    class Thing:
        def where(self, x):
            return x, threading.get_ident()

    value, ident = await Threaded(Thing(), pool).where(5)
    assert value == 5 and ident != threading.get_ident()
