"""The lockout threshold on a busy machine (issue #30): forty simultaneous
LDAPS binds for one account from a place it signed in from before, the
right password among them, while other sign-ins run and a process keeps a
core busy. slapd's log says how many passwords reached it; the audit log
says in which order the proxy decided.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import audit_text, require_tool, wait_until
from tests.integration.conftest import PRIMARY
from tests.proxyd import ProxyDaemon

pytestmark = pytest.mark.integration

THRESHOLD = 10


@pytest.fixture(scope="module")
def daemon(slapd, tmp_path_factory):
    daemon = ProxyDaemon(tmp_path_factory.mktemp("proxy-lockout"), slapd, {
        "ldaps": {"protocol": "ldap", "realm": "cloud", "tls": "implicit",
                  "max_connections_per_source": 1000},
    }, throttle=f"  source_delay: 0.05\n  source_delay_max: 0.2\n"
                f"  account_failures: {THRESHOLD}\n  lockout: 10m")
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def bind(daemon, dn, password) -> subprocess.Popen:
    return subprocess.Popen(
        [require_tool("ldapwhoami"), "-x", "-H", f"ldaps://127.0.0.1:{daemon.ports['ldaps']}",
         "-D", dn, "-w", password, "-o", "nettimeout=60"],
        env=daemon.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def binds_of(slapd, dn, since: int) -> list[str]:
    return re.findall(rf'BIND dn="{re.escape(dn)}" method=128', slapd.log_text()[since:],
                      re.IGNORECASE)


def audited(daemon, user: str) -> list[str]:
    """The reasons of the user's sign-ins, in the order they were decided."""
    lines = audit_text(daemon.folder / "audit.log").splitlines()
    events = [json.loads(line) for line in lines]
    return [e["reason"] for e in events if e.get("event") == "authentication"
            and e.get("user") == user]


class Load:
    """Other sign-ins in a loop, and a process that keeps a core busy."""

    def __init__(self, daemon, dn: str) -> None:
        self.stop = threading.Event()
        self.done = 0
        self.burner = subprocess.Popen(
            [sys.executable, "-c", "import time\nend = time.time() + 120\n"
                                   "while time.time() < end: pass"])
        self.thread = threading.Thread(target=self._run, args=(daemon, dn), daemon=True)
        self.thread.start()

    def _run(self, daemon, dn) -> None:
        while not self.stop.is_set():
            assert bind(daemon, dn, PRIMARY).wait(60) == 0
            self.done += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)
        self.burner.kill()
        self.burner.wait()


@pytest.mark.parametrize("right", [29, 1, 4])
def test_forty_binds_at_once_reach_slapd_no_more_than_the_threshold(daemon, slapd, unique,
                                                                     right):
    """The right password past the threshold (the thirtieth) is refused;
    sent among the first, it may be accepted, and then guesses made beside
    it do not start a new count."""
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY)
    other = slapd.add_user(unique(), PRIMARY)
    # The account signed in from here before: this is a familiar place.
    before = len(slapd.log_text())
    assert bind(daemon, dn, PRIMARY).wait(60) == 0
    assert wait_until(lambda: binds_of(slapd, dn, before), 10)
    since = len(slapd.log_text())
    secrets = [f"guess-{right}-{i}" for i in range(40)]
    secrets[right] = PRIMARY
    with Load(daemon, other) as load:
        clients = [bind(daemon, dn, secret) for secret in secrets]
        codes = [client.wait(120) for client in clients]
        assert load.done > 0
    assert set(codes) <= {0, 49}, codes
    time.sleep(0.5)  # slapd writes its log a moment after it answers
    binds = len(binds_of(slapd, dn, since))
    reasons = audited(daemon, uid)[1:]  # after the first sign-in
    assert len(reasons) == 40, reasons
    assert set(reasons) <= {"wrong_secret", "locked_out", "primary"}, reasons
    if "primary" in reasons:
        # Accepted only within the threshold, and then (a success forgives
        # what was counted before it) no more than the threshold again.
        before = reasons[:reasons.index("primary")].count("wrong_secret")
        assert before < THRESHOLD, reasons
        # One more bind: the accepted session's own connection, bound as the user.
        assert binds <= THRESHOLD + before + 1 + 1, (binds, reasons)
    else:
        assert reasons.count("wrong_secret") == THRESHOLD, reasons
        assert binds == THRESHOLD, (binds, reasons)
