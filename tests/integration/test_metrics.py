"""The metrics listener, read with curl while real clients use the daemon
in front of real slapd and Dovecot."""

from __future__ import annotations

import imaplib
import re
import ssl
import subprocess

import pytest

from tests.conftest import require_tool
from tests.integration.conftest import PRIMARY
from tests.proxyd import ProxyDaemon, free_port, mail_backend


@pytest.fixture(scope="module")
def proxy(slapd, dovecot, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy-metrics")
    port = free_port()
    daemon = ProxyDaemon(folder, slapd, {
        "imap": mail_backend(folder, dovecot, "imap"),
        "ldap": {"protocol": "ldap", "realm": "cloud"},
    }, extra=f"metrics:\n  endpoint: tcp:{port}:interface=127.0.0.1\n",
        throttle="  source_delay: 0.01\n  source_delay_max: 0.01\n  account_failures: 2")
    daemon.metrics_port = port
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def curl(proxy, path):
    done = subprocess.run([require_tool("curl"), "-s", "-o", "-", "-w", "\n%{http_code}",
                           f"http://127.0.0.1:{proxy.metrics_port}{path}"],
                          capture_output=True, text=True, timeout=30)
    body, _, code = done.stdout.rpartition("\n")
    return int(code), body


@pytest.mark.integration
def test_no_answer_names_the_server_software(proxy):
    for path in ("/metrics", "/health/live", "/nothing"):
        done = subprocess.run([require_tool("curl"), "-sS", "-D", "-", "-o", "/dev/null",
                               f"http://127.0.0.1:{proxy.metrics_port}{path}"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stdout.startswith("HTTP/1.1 "), done.stderr
        assert "server:" not in done.stdout.lower() and "twisted" not in done.stdout.lower(), done.stdout


def value(text, name, **labels):
    """The sum of a family's samples whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        match = re.match(rf"{name}(\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
            found = True
    assert found, f"no {name} {labels} in the metrics"
    return total


def test_every_family_counts_what_flowed(proxy, slapd, dovecot, user, unique):
    uid, dn, secret = user
    context = ssl.create_default_context(cafile=str(proxy.pki.ca_file))
    client = imaplib.IMAP4("127.0.0.1", proxy.ports["imap"], timeout=30)
    client.starttls(context)
    client.login(uid, secret)
    client.select("INBOX")  # the session stays open while metrics are read
    refused = imaplib.IMAP4("127.0.0.1", proxy.ports["imap"], timeout=30)
    refused.starttls(context)
    locked = unique()
    slapd.add_user(locked, PRIMARY)
    for guess in ("one", "two", "three"):
        with pytest.raises(imaplib.IMAP4.error):
            refused.login(locked, guess)
        # A name with no account is locked out alike, and not counted as one.
        with pytest.raises(imaplib.IMAP4.error):
            refused.login("nobody-" + locked, guess)
    env = dict(proxy.env())
    done = subprocess.run([require_tool("ldapwhoami"), "-x", "-ZZ", "-H",
                           f"ldap://127.0.0.1:{proxy.ports['ldap']}", "-D", dn, "-w", PRIMARY],
                          capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    code, text = curl(proxy, "/metrics")
    assert code == 200
    p = "legacy_auth_proxy_"
    assert value(text, p + "sign_ins_total", protocol="imap", outcome="accepted",
                 reason="app_password") >= 1
    assert value(text, p + "sign_ins_total", protocol="imap", reason="wrong_secret") >= 1
    assert value(text, p + "sign_ins_total", protocol="ldap", reason="primary") >= 1
    assert value(text, p + "decision_seconds_count", protocol="imap") >= 4
    assert value(text, p + "cache_lookups_total", cache="app_password") >= 1
    assert value(text, p + "backend_logins_total", listener="imap", result="ok") >= 1
    assert value(text, p + "backend_login_seconds_count", listener="imap") >= 1
    assert value(text, p + "directory_seconds_count") >= 1
    assert value(text, p + "connections", listener="imap") >= 1
    assert value(text, p + "sessions", listener="imap") >= 1
    assert value(text, p + "relayed_bytes_total", listener="imap", direction="to_client") > 0
    assert value(text, p + "pool_capacity", pool="argon2") > 0
    assert value(text, p + "pool_calls", pool="store") >= 0
    assert value(text, p + "directory_up") == 1
    assert value(text, p + "lockouts") == 1  # the account, neither its places nor the name
    assert value(text, p + "backend_up", listener="imap") == 1
    assert value(text, p + "ready") == 1
    assert curl(proxy, "/health/live") == (200, "ok\n")
    assert curl(proxy, "/health/ready") == (200, "ok\n")
    client.logout()
    refused.shutdown()


def test_readiness_follows_the_directory(slapd, dovecot, tmp_path):
    """Past the outage grace (here: none), a directory that does not answer
    makes the daemon not ready; it is ready again once it answers."""
    from tests.conftest import wait_until

    port = free_port()
    daemon = ProxyDaemon(tmp_path, slapd, {"ldap": {"protocol": "ldap", "realm": "cloud"}},
                         extra=f"metrics:\n  endpoint: tcp:{port}:interface=127.0.0.1\n",
                         directory="  outage_grace: 0\n  timeout: 1s")
    daemon.metrics_port = port
    daemon.start()
    try:
        assert curl(daemon, "/health/ready") == (200, "ok\n")
        slapd.stop()
        try:
            def not_ready():
                # A sign-in makes the daemon ask the directory.
                subprocess.run([require_tool("ldapwhoami"), "-x", "-ZZ", "-H",
                                f"ldap://127.0.0.1:{daemon.ports['ldap']}", "-D", "nobody",
                                "-w", "x"], capture_output=True, env=daemon.env(), timeout=30)
                return curl(daemon, "/health/ready")[0] == 503
            assert wait_until(not_ready, 30)
            assert "directory" in curl(daemon, "/health/ready")[1]
            assert curl(daemon, "/health/live")[0] == 200
        finally:
            slapd.start()
        assert wait_until(lambda: curl(daemon, "/health/ready")[0] == 200, 40)
    finally:
        assert daemon.stop() == 0


def test_the_alert_rules_pass_promtool():
    from pathlib import Path

    rules = Path(__file__).resolve().parents[2] / "config" / "alerts.yml"
    done = subprocess.run([require_tool("promtool"), "check", "rules", str(rules)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
