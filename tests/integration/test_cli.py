"""The command line tool, end to end, in a temporary folder."""

import json
import os
import re
import sqlite3
import subprocess
import sys

import pytest

from proxy.cli import main
from tests.conftest import wait_until

SECRET_LINE = re.compile(r"^    ([a-z]{4}) ([a-z]{4}) ([a-z]{4}) ([a-z]{4})$", re.MULTILINE)


def run(workdir, *args, capsys):
    code = main(["--config", str(workdir / "config.yaml"), *args])
    out, err = capsys.readouterr()
    return code, out, err


def cli(workdir, *args, env=None, input=None):
    """The real console entry point, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(workdir / "config.yaml"), *args],
        capture_output=True, text=True, timeout=60, env=env, input=input,
    )


def created_secret(out):
    (match,) = SECRET_LINE.finditer(out)
    return "".join(match.groups())


def test_create_shows_the_secret_once_and_it_is_nowhere_else(workdir):
    done = cli(workdir, "app-password", "create", "Alice@Example.test", "--name", "Outlook 2010")
    assert done.returncode == 0, done.stderr
    secret = created_secret(done.stdout)
    grouped = " ".join(secret[i:i + 4] for i in range(0, 16, 4))
    lines = [line for line in done.stdout.splitlines() if secret in line.replace(" ", "")]
    assert len(lines) == 1 and grouped in lines[0]
    assert secret not in done.stderr
    listing = cli(workdir, "app-password", "list", "alice@example.test")
    assert "Outlook 2010" in listing.stdout
    forms = [secret, grouped, secret.upper()]
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"store.sqlite3", "audit.log", "pepper"}
    for path in files:
        data = path.read_bytes()
        for form in forms:
            assert form.encode() not in data, f"{form!r} found in {path.name}"
    for form in forms:
        assert form not in listing.stdout + listing.stderr


def test_the_41st_is_refused_with_a_clear_message(workdir, capsys):
    for i in range(40):
        code, out, err = run(workdir, "app-password", "create", "bob", "--name", f"device {i}",
                             capsys=capsys)
        assert code == 0, err
    code, out, err = run(workdir, "app-password", "create", "bob", "--name", "one more",
                         capsys=capsys)
    assert code == 1
    assert out == ""
    assert "bob already has 40 app passwords" in err
    assert "legacy-auth-proxy app-password list bob" in err
    assert "delete bob" in err
    code, out, err = run(workdir, "app-password", "delete", "bob", "device 7", capsys=capsys)
    assert code == 0
    code, out, err = run(workdir, "app-password", "create", "bob", "--name", "one more",
                         capsys=capsys)
    assert code == 0


def test_delete_by_id_and_by_name_and_revoke_all(workdir, capsys):
    ids = []
    for name in ("laptop", "phone", "printer"):
        code, out, _ = run(workdir, "app-password", "create", "carol", "--name", name, "--json",
                           capsys=capsys)
        assert code == 0
        ids.append(json.loads(out)["id"])
    code, out, _ = run(workdir, "app-password", "delete", "carol", ids[0], capsys=capsys)
    assert code == 0 and "laptop" in out
    code, out, _ = run(workdir, "app-password", "delete", "carol", "phone", capsys=capsys)
    assert code == 0 and ids[1] in out
    code, out, err = run(workdir, "app-password", "delete", "carol", "phone", capsys=capsys)
    assert code == 1 and "no app password" in err
    code, out, _ = run(workdir, "app-password", "list", "carol", "--json", capsys=capsys)
    assert [a["name"] for a in json.loads(out)] == ["printer"]
    code, out, _ = run(workdir, "app-password", "revoke-all", "carol", capsys=capsys)
    assert code == 0 and "all 1 app passwords" in out
    code, out, _ = run(workdir, "app-password", "list", "carol", capsys=capsys)
    assert "no app passwords" in out
    events = [json.loads(line)["event"] for line in (workdir / "audit.log").read_text().splitlines()]
    assert events == ["app_password_created"] * 3 + ["app_password_deleted"] * 2 + [
        "app_passwords_revoked"]


def test_expiry_and_scope_are_recorded_and_listed(workdir, capsys):
    code, out, err = run(workdir, "app-password", "create", "dave", "--name", "scanner",
                         "--expires", "2d", "--protocols", "SMTP, imap", "--json", capsys=capsys)
    assert code == 0, err
    made = json.loads(out)
    assert made["protocols"] == ["imap", "smtp"]
    assert made["expires_at"] is not None
    assert len(made["secret"].replace(" ", "")) == 16
    code, out, _ = run(workdir, "app-password", "list", "dave", capsys=capsys)
    assert "imap,smtp" in out and "scanner" in out
    assert made["secret"] not in out
    code, out, err = run(workdir, "app-password", "create", "dave", "--name", "old",
                         "--expires", "2001-01-01", capsys=capsys)
    assert code == 1 and "in the past" in err
    code, out, err = run(workdir, "app-password", "create", "dave", "--name", "x",
                         "--protocols", "nntp", capsys=capsys)
    assert code == 2 and "imap, ldap, pop3, smtp" in err
    code, out, err = run(workdir, "app-password", "create", "dave", "--name", "x",
                         "--expires", "someday", capsys=capsys)
    assert code == 2 and "--expires" in err


def test_networks_stopped_ones_unlock_and_reset(workdir, capsys):
    code, out, err = run(workdir, "app-password", "create", "erin", "--name", "scanner",
                         "--network", "192.0.2.9/24", "--network", "2001:db8::/32", "--json",
                         capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["networks"] == ["192.0.2.0/24", "2001:db8::/32"]
    code, out, err = run(workdir, "app-password", "create", "erin", "--name", "x",
                         "--network", "192.0.2.0/33", capsys=capsys)
    assert code == 1 and "not a network in CIDR form" in err
    code, out, err = run(workdir, "app-password", "create", "erin", "--name", "brief",
                         "--expires", "1s", capsys=capsys)
    assert code == 0, err

    def listing() -> str:
        return run(workdir, "app-password", "list", "erin", capsys=capsys)[1]

    # It lapses a second from now: polled, with a deadline, not slept for.
    assert wait_until(lambda: "(expired)" in listing(), 5)
    out = listing()
    assert "192.0.2.0/24,2001:db8::/32" in out
    [brief] = [line for line in out.splitlines() if " brief " in line]
    assert "stopped" in brief and "(expired)" in brief
    code, out, _ = run(workdir, "app-password", "list", "erin", "--json", capsys=capsys)
    assert {a["name"]: a["stopped"] for a in json.loads(out)} == {"scanner": None, "brief": "expired"}
    code, out, _ = run(workdir, "user", "unlock", "Erin", capsys=capsys)
    assert code == 0 and "erin" in out
    code, out, _ = run(workdir, "user", "reset-second-factor", "erin", capsys=capsys)
    assert code == 0 and "had no authenticator" in out
    code, out, _ = run(workdir, "user", "reset-passkeys", "erin", capsys=capsys)
    assert code == 0 and "erin had no passkeys." in out
    audit = [json.loads(line) for line in (workdir / "audit.log").read_text().splitlines()]
    assert {"lockout_lifted", "second_factor_reset"} <= {e["event"] for e in audit}
    sent = sqlite3.connect(workdir / "store.sqlite3").execute(
        "SELECT kind FROM changes WHERE username = 'erin'").fetchall()
    assert ("unlocked",) in sent


@pytest.mark.integration
def test_what_the_store_holds_is_listed_escaped(workdir, capsys):
    """An old row (written before PROXY headers with zone ids were refused,
    or by hand) with an escape sequence and a line break in its last-used
    address and its name: the table shows them as escapes, on one line, and
    the JSON keeps its value with no raw control or line separator."""
    code, out, err = run(workdir, "app-password", "create", "frank", "--name", "tablet", "--json",
                         capsys=capsys)
    assert code == 0, err
    db = sqlite3.connect(workdir / "store.sqlite3")
    with db:
        db.execute("UPDATE app_passwords SET name = ?, last_used_at = 1794787200,"
                   " last_used_address = ?, last_used_protocol = 'imap' WHERE id = ?",
                   ("tab\u2028let", "fe80::1%\x1b[31mZONE\nX", json.loads(out)["id"]))
    db.close()
    code, out, err = run(workdir, "app-password", "list", "frank", capsys=capsys)
    assert code == 0, err
    assert "\x1b" not in out and "\u2028" not in out
    [row] = out.splitlines()[1:]
    assert "fe80::1%\\x1b[31mZONE\\x0aX" in row and "tab\\u2028let" in row
    code, out, err = run(workdir, "app-password", "list", "frank", "--json", capsys=capsys)
    assert code == 0, err
    assert "\u2028" not in out
    [listed] = json.loads(out)
    assert listed["last_used_address"] == "fe80::1%\x1b[31mZONE\nX" and listed["name"] == "tab\u2028let"


def test_names_are_checked_and_unique(workdir, capsys):
    code, _, err = run(workdir, "app-password", "create", "erin", "--name", "x" * 65,
                       capsys=capsys)
    assert code == 1 and "1 to 64" in err
    assert run(workdir, "app-password", "create", "erin", "--name", "tablet", capsys=capsys)[0] == 0
    code, _, err = run(workdir, "app-password", "create", "ERIN", "--name", "tablet",
                       capsys=capsys)
    assert code == 1 and "already has an app password named 'tablet'" in err


def test_users_mfa_state_and_enrolment(workdir, capsys):
    code, out, _ = run(workdir, "user", "show", "frank", "--json", capsys=capsys)
    assert json.loads(out)["mfa_state"] == "disabled"
    code, out, _ = run(workdir, "user", "set-mfa", "frank", "enabled", capsys=capsys)
    assert code == 0 and "enabled" in out
    code, out, _ = run(workdir, "user", "enroll", "frank", "--name", "Outlook", capsys=capsys)
    assert code == 0
    assert "state enforced" in out
    created_secret(out)
    code, out, _ = run(workdir, "user", "show", "frank", "--json", capsys=capsys)
    shown = json.loads(out)
    assert shown["mfa_state"] == "enforced"
    assert shown["mfa_registered_at"] is not None
    assert shown["app_passwords"] == 1
    code, out, _ = run(workdir, "user", "show", "frank", capsys=capsys)
    assert "1 of 40" in out
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(workdir / "config.yaml"), "user", "set-mfa", "frank", "sometimes"])
    assert exited.value.code == 2


def test_bad_user_names_are_refused(workdir, capsys):
    code, _, err = run(workdir, "app-password", "list", "a\nb", capsys=capsys)
    assert code == 1 and "control characters" in err


def test_a_malformed_config_exits_78_naming_file_line_and_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("store:\n  path: s.db\npolicy:\n  max_app_passwords_per_user: lots\n")
    for args in (["check-config"], ["app-password", "list", "x"], ["serve"]):
        done = subprocess.run([sys.executable, "-m", "proxy", "--config", str(config), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 78, args
        assert f"{config}:4: policy.max_app_passwords_per_user: expected an integer" in done.stderr
        assert not (tmp_path / "s.db").exists()


def test_the_config_comes_from_the_environment_when_not_given(workdir):
    env = {**os.environ, "LEGACY_AUTH_PROXY_CONFIG": str(workdir / "config.yaml")}
    done = subprocess.run([sys.executable, "-m", "proxy", "check-config"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0
    assert str(workdir / "config.yaml") in done.stdout


@pytest.mark.parametrize("command", [
    [], ["app-password"], ["app-password", "create"], ["app-password", "list"],
    ["app-password", "delete"], ["app-password", "revoke-all"], ["user"], ["user", "show"],
    ["user", "set-mfa"], ["user", "enroll"], ["user", "unlock"], ["user", "reset-second-factor"],
    ["user", "reset-passkeys"],
    ["migrate"], ["check-config"], ["serve"], ["demo"],
])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert "usage: legacy-auth-proxy" in capsys.readouterr().out


def test_a_lost_pepper_is_not_silently_replaced(workdir, capsys):
    assert run(workdir, "app-password", "create", "gina", "--name", "a", capsys=capsys)[0] == 0
    (workdir / "pepper").unlink()
    code, _, err = run(workdir, "app-password", "list", "gina", capsys=capsys)
    assert code == 78
    assert "restore it from a backup" in err
    assert not (workdir / "pepper").exists()


def test_the_store_survives_sigkill_mid_creation(workdir):
    """Kill a process that creates app passwords as fast as it can, several
    times; every time the database is intact and holds whole records only."""
    script = (
        "import sys, time\n"
        "from proxy.cli import Context\n"
        "admin = Context(sys.argv[1]).admin()\n"
        "i = int(sys.argv[2])\n"
        "while True:\n"
        "    r = admin.create(f'user{i % 50}', f'device {i}').record\n"
        "    print(r.id, flush=True)\n"
        "    i += 1\n"
    )
    printed = set()
    for round in range(6):
        child = subprocess.Popen([sys.executable, "-c", script, str(workdir / "config.yaml"),
                                  str(round * 100_000)], stdout=subprocess.PIPE, text=True)
        # Wait for a few creations, then kill it wherever it is.
        for _ in range(5 + round * 7):
            printed.add(child.stdout.readline().strip())
        child.kill()
        rest, _ = child.communicate()
        printed.update(rest.split())
        db = sqlite3.connect(workdir / "store.sqlite3")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute(
            "SELECT id, length(lookup_key), password_hash, name, created_at FROM app_passwords"
        ).fetchall()
        db.close()
        stored = {r[0] for r in rows}
        for _, key_length, encoded, name, created in rows:
            assert key_length == 32 and encoded.startswith("$argon2id$") and name and created
        # Everything reported as created is there; at most one more that
        # committed just before the kill.
        assert printed <= stored
        assert len(stored - printed) <= 1
        printed = stored


def test_an_older_store_is_checked_and_migrate_brings_it_up_to_date(workdir, capsys):
    from proxy.store.sqlite import MIGRATIONS

    db = sqlite3.connect(workdir / "store.sqlite3")
    db.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
    db.close()
    code, out, err = run(workdir, "app-password", "list", "alice", capsys=capsys)
    assert code == 78 and "run 'legacy-auth-proxy migrate'" in err
    code, out, err = run(workdir, "migrate", capsys=capsys)
    assert code == 0 and f"version {len(MIGRATIONS)}, the latest" in out
    code, out, err = run(workdir, "app-password", "list", "alice", capsys=capsys)
    assert code == 0
