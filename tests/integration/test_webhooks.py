"""Audit events to a webhook, from the real daemon (tests/proxyd.py) on its
SQLite store to a real HTTP receiver (tests/webhook_receiver.py), with the
real slapd: every event signed and in order per user; a receiver down for a
while gets everything when it comes back; a daemon killed with SIGKILL
mid-delivery loses nothing; the backlog and failures in the metrics."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import PRIMARY
from tests.integration.test_directory_outage import ldap_bind
from tests.proxyd import ProxyDaemon, free_port
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.integration

PLAIN = {"tls": "none", "allow_plaintext_auth": True}


def webhook_config(receiver: Receiver, events: str = '["*"]', extra: str = "") -> str:
    return (f"webhooks:\n  - name: test\n    url: {receiver.url}\n"
            f"    secret_file: {receiver.secret_file}\n    events: {events}\n"
            f"    timeout: 3s\n    retry_initial: 0.2\n    retry_max: 1s\n{extra}")


@pytest.fixture
def receiver(tmp_path):
    r = Receiver(tmp_path)
    r.start()
    yield r
    r.stop()


@pytest.fixture
def daemon(slapd, tmp_path, receiver):
    metrics = free_port()
    d = ProxyDaemon(tmp_path / "node", slapd, {"ldap": {"protocol": "ldap", "realm": "cloud",
                                                        **PLAIN}},
                    extra=f"metrics:\n  endpoint: tcp:{metrics}:interface=127.0.0.1\n"
                          + webhook_config(receiver))
    d.metrics_port = metrics
    d.start()
    yield d
    if d.process.poll() is None:
        assert d.stop() == 0


def metrics(daemon) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics",
                                  timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("legacy_auth_proxy_webhook"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def create(daemon, user: str, names) -> None:
    for name in names:
        done = daemon.cli("app-password", "create", user, "--name", name, "--json")
        assert done.returncode == 0, done.stderr


def names_received(receiver, user):
    return [e["app_password_name"] for e in receiver.received("app_password_created", user)]


def test_every_event_arrives_signed_once_in_order_per_user(daemon, receiver, slapd, unique):
    alice, bob = unique("alice"), unique("bob")
    slapd.add_user(alice, PRIMARY)
    slapd.add_user(bob, PRIMARY)
    create(daemon, alice, ["a1", "a2"])
    create(daemon, bob, ["b1"])
    create(daemon, alice, ["a3"])
    # Sign-ins: the daemon's own events (accepted, refused).
    assert ldap_bind(daemon, f"uid={alice},{slapd.people_dn}", PRIMARY) == 0
    assert ldap_bind(daemon, f"uid={bob},{slapd.people_dn}", "wrong") == 49
    assert wait_until(lambda: len(receiver.received("authentication")) >= 2, timeout=30)
    assert wait_until(lambda: len(names_received(receiver, alice)) == 3, timeout=30)
    assert names_received(receiver, alice) == ["a1", "a2", "a3"]
    assert names_received(receiver, bob) == ["b1"]
    outcomes = {(e["user"], e["outcome"]) for e in receiver.received("authentication")}
    assert outcomes == {(alice, "accepted"), (bob, "refused")}
    assert receiver.bad_signatures == 0
    ids = [e["id"] for e in receiver.received()]
    assert len(ids) == len(set(ids))
    # The daemon's start too (an event of no user).
    assert receiver.received("daemon_started")
    assert wait_until(lambda: metrics(daemon).get(
        'legacy_auth_proxy_webhook_backlog{webhook="test"}') == 0, timeout=30)
    m = metrics(daemon)
    assert m['legacy_auth_proxy_webhook_deliveries_total{webhook="test"}'] >= 3
    assert m['legacy_auth_proxy_webhook_oldest_undelivered_seconds{webhook="test"}'] == 0


def test_a_receiver_down_for_a_while_gets_everything_when_it_comes_back(daemon, receiver, slapd,
                                                                        unique):
    user = unique("carol")
    slapd.add_user(user, PRIMARY)
    receiver.status = 503  # failing first
    create(daemon, user, ["c1", "c2"])
    assert wait_until(lambda: metrics(daemon).get(
        'legacy_auth_proxy_webhook_failures_total{reason="status_5xx",webhook="test"}', 0) >= 2,
        timeout=30)
    receiver.stop()  # then down: connections refused
    create(daemon, user, ["c3", "c4"])
    assert wait_until(lambda: metrics(daemon).get(
        'legacy_auth_proxy_webhook_failures_total{reason="connection",webhook="test"}', 0) >= 2,
        timeout=30)
    assert wait_until(lambda: metrics(daemon).get(
        'legacy_auth_proxy_webhook_backlog{webhook="test"}', 0) >= 4, timeout=30)
    assert names_received(receiver, user) == []
    receiver.status = 200
    receiver.start()
    assert wait_until(lambda: len(names_received(receiver, user)) == 4, timeout=30)
    assert names_received(receiver, user) == ["c1", "c2", "c3", "c4"]
    assert receiver.bad_signatures == 0


def test_a_daemon_killed_mid_delivery_loses_nothing(daemon, receiver, slapd, unique):
    user = unique("dave")
    slapd.add_user(user, PRIMARY)
    receiver.hold()  # posts arrive and wait: the daemon is mid-delivery
    create(daemon, user, ["d1", "d2", "d3"])
    assert wait_until(lambda: receiver.posts >= 1, timeout=30)
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(30)
    receiver.release()  # the killed daemon's post is answered now, to no one
    create(daemon, user, ["d4"])  # the command line writes to the outbox meanwhile
    daemon.start()
    assert wait_until(lambda: names_received(receiver, user)[-1:] == ["d4"], timeout=60)
    got = names_received(receiver, user)
    # At least once, in order: the post cut short may come twice, nothing is lost.
    assert [n for i, n in enumerate(got) if i == 0 or got[i - 1] != n] == ["d1", "d2", "d3", "d4"]
    assert receiver.bad_signatures == 0


def test_a_webhook_gets_only_the_events_it_asks_for(slapd, tmp_path, unique):
    receiver = Receiver(tmp_path)
    receiver.start()
    d = ProxyDaemon(tmp_path / "node", slapd, {"ldap": {"protocol": "ldap", "realm": "cloud",
                                                        **PLAIN}},
                    extra=webhook_config(receiver, '["app_password_deleted"]'))
    d.start()
    try:
        user = unique("erin")
        slapd.add_user(user, PRIMARY)
        create(d, user, ["e1"])
        assert d.cli("app-password", "delete", user, "e1").returncode == 0
        assert wait_until(lambda: receiver.received("app_password_deleted", user), timeout=30)
        assert {e["event"] for e in receiver.received()} == {"app_password_deleted"}
    finally:
        assert d.stop() == 0
        receiver.stop()


def test_a_secret_file_that_cannot_be_read_stops_the_daemon_and_names_it(slapd, tmp_path):
    receiver = Receiver(tmp_path)
    receiver.secret_file.write_text("short\n")
    d = ProxyDaemon(tmp_path / "node", slapd, {"ldap": {"protocol": "ldap", "realm": "cloud",
                                                        **PLAIN}},
                    extra=webhook_config(receiver))
    done = subprocess.run([sys.executable, "-m", "proxy", "--config", str(d.config), "serve"],
                          capture_output=True, text=True, timeout=60, cwd=d.folder)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "webhooks[0].secret_file" in output and str(receiver.secret_file) in output
    assert "at least 16 bytes" in output


def test_https_receivers_are_checked_against_their_ca(slapd, tmp_path, unique):
    from tests.pki import make_pki

    trusted = make_pki(tmp_path / "trusted")
    other = make_pki(tmp_path / "other", organization="someone else")
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good, bad = Receiver(tmp_path / "good", trusted), Receiver(tmp_path / "bad", other)
    for r in (good, bad):
        r.start()
    config = webhook_config(good, extra=f"    ca_file: {trusted.ca_file}\n") + (
        webhook_config(bad, extra=f"    ca_file: {trusted.ca_file}\n")
        .replace("webhooks:\n", "").replace("name: test", "name: impostor"))
    metrics_port = free_port()
    d = ProxyDaemon(tmp_path / "node", slapd, {"ldap": {"protocol": "ldap", "realm": "cloud",
                                                        **PLAIN}},
                    extra=f"metrics:\n  endpoint: tcp:{metrics_port}:interface=127.0.0.1\n"
                          + config)
    d.metrics_port = metrics_port
    d.start()
    try:
        user = unique("tls")
        slapd.add_user(user, PRIMARY)
        create(d, user, ["t1"])
        assert wait_until(lambda: names_received(good, user) == ["t1"], timeout=30)
        # A receiver whose certificate the CA did not sign gets nothing: the
        # handshake fails, counted as a connection failure, and retried.
        assert wait_until(lambda: metrics(d).get(
            'legacy_auth_proxy_webhook_failures_total{reason="connection",webhook="impostor"}',
            0) >= 2, timeout=30)
        assert bad.posts == 0 and good.bad_signatures == 0
    finally:
        assert d.stop() == 0
        good.stop()
        bad.stop()
