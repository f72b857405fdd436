"""Shared fixtures. Integration fixtures that start real servers live in
tests/integration/conftest.py."""

import os
import shutil
import time
from pathlib import Path

import pytest

# Cheap argon2 parameters for tests that create many app passwords; the
# defaults are exercised by tests that say so.
FAST_HASHING = "hashing:\n  time_cost: 1\n  memory_kib: 1024\n"


def require_tool(name: str) -> str:
    """The path of a program the tests need. In CI its absence is a failure,
    never a skip: tests/run installs it."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/lib/cyrus/bin/{name}")
         if os.access(p, os.X_OK)), None
    )
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed; tests/run installs it")
    pytest.skip(f"{name} is not installed (tests/run installs it)")


INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(items):
    """Every test under tests/integration/ needs real servers or tools: it is
    marked ``integration`` here, in one place, so that
    ``tests/run -m "not integration"`` runs the fast layer alone."""
    for item in items:
        if INTEGRATION in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def workdir(tmp_path):
    """A folder with a config whose state lives beside it."""
    (tmp_path / "config.yaml").write_text(
        "store:\n  path: store.sqlite3\n  pepper_file: pepper\n"
        "audit:\n  file: audit.log\n" + FAST_HASHING
    )
    return tmp_path


def ended(client) -> bool:
    """Whether the server has closed an imaplib session (a NOOP no longer goes through)."""
    import imaplib

    try:
        client.noop()
    except (imaplib.IMAP4.abort, OSError):
        return True
    return False


def wait_until(predicate, timeout: float) -> bool:
    """Poll ``predicate`` every 0.1 s until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def at_once(target, *args, processes: int = 2) -> list:
    """What ``target(*args)`` returned (or the text of what it raised) in
    each of ``processes`` processes started together, as the workers of one
    daemon, or a command beside the daemon, start."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier, answers = context.Barrier(processes), context.Queue()

    def run() -> None:
        barrier.wait()
        try:
            answers.put(target(*args))
        except Exception as e:  # the answer: what it raised, in words
            answers.put(f"{type(e).__name__}: {e}")

    started = [context.Process(target=run) for _ in range(processes)]
    for process in started:
        process.start()
    got = [answers.get(timeout=60) for _ in started]
    for process in started:
        process.join()
    return got


def audit_text(path: Path, quiet: float = 0.1, timeout: float = 10.0) -> str:
    """The audit file's text once nothing has been added to it for ``quiet``
    seconds: the daemon writes it from a thread, and under load gathers the
    events of a moment before (proxy.daemon.auditing.GATHER)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        text = path.read_text() if path.exists() else ""
        if text == last or time.monotonic() > deadline:
            return text
        last = text
        time.sleep(quiet)
