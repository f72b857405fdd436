"""The systemd unit passes `systemd-analyze verify`, and its companions parse."""

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]


def test_the_unit_verifies(tmp_path):
    analyze = require_tool("systemd-analyze")
    # verify checks that ExecStart's program exists: point it at the one this
    # test run installed, keeping everything else as shipped.
    beside = Path(sys.executable).parent / "legacy-auth-proxy"
    program = shutil.which("legacy-auth-proxy") or (str(beside) if beside.exists() else None)
    assert program, "the package's console script is not installed"
    text = (ROOT / "systemd" / "legacy-auth-proxy.service").read_text()
    assert text.count("/usr/bin/legacy-auth-proxy") == 1
    unit = tmp_path / "legacy-auth-proxy.service"
    unit.write_text(text.replace("/usr/bin/legacy-auth-proxy", program))
    done = subprocess.run([analyze, "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=120)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if "legacy-auth-proxy" in line]
    assert done.returncode == 0, done.stdout + done.stderr
    assert problems == [], problems


def test_the_unit_has_the_hardening_we_promise():
    text = (ROOT / "systemd" / "legacy-auth-proxy.service").read_text()
    for line in ("ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "ExecReload=/bin/kill -HUP $MAINPID",
                 "StateDirectory=legacy-auth-proxy", "ConfigurationDirectory=legacy-auth-proxy",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                 "SystemCallFilter=@system-service", "RestartPreventExitStatus=78"):
        assert line in text.splitlines(), line


def test_the_unit_starts_the_daemon_again_until_the_store_answers():
    """Exit 75 (the store cannot be reached) is restarted, with no start
    limit to give up at; 78 (bad config or state) is not. RestartPreventExitStatus=
    reads only the main process's status: no ExecStartPre= could fail with 78
    and be restarted for ever."""
    lines = (ROOT / "systemd" / "legacy-auth-proxy.service").read_text().splitlines()
    for line in ("Restart=on-failure", "StartLimitIntervalSec=0", "RestartPreventExitStatus=78"):
        assert line in lines, line
    prevented = [line for line in lines if line.startswith("RestartPreventExitStatus=")]
    assert not any("75" in line or "TEMPFAIL" in line for line in prevented)
    assert not any(line.startswith("ExecStartPre=") for line in lines)


def test_sysusers_and_tmpfiles_create_the_account_and_folders(tmp_path):
    """Applied to an empty root: the account appears, then the folders with
    the owners and modes the daemon relies on."""
    sysusers = require_tool("systemd-sysusers")
    tmpfiles = require_tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    done = subprocess.run([sysusers, f"--root={root}",
                           str(ROOT / "systemd" / "legacy-auth-proxy.sysusers")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    entry = next(line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()
                 if line.startswith("legacy-auth-proxy:"))
    uid, gid, home = int(entry[2]), int(entry[3]), entry[5]
    assert home == "/var/lib/legacy-auth-proxy" and entry[6].endswith("nologin")
    done = subprocess.run([tmpfiles, f"--root={root}", "--create",
                           str(ROOT / "systemd" / "legacy-auth-proxy.tmpfiles")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = {
        "etc/legacy-auth-proxy": (0o750, 0, gid),
        "var/lib/legacy-auth-proxy": (0o700, uid, gid),
        "var/log/legacy-auth-proxy": (0o750, uid, gid),
    }
    for folder, (mode, owner, group) in expected.items():
        info = (root / folder).stat()
        assert (info.st_mode & 0o777, info.st_uid, info.st_gid) == (mode, owner, group), folder


def test_the_socket_unit_verifies(tmp_path):
    analyze = require_tool("systemd-analyze")
    socket_unit = tmp_path / "legacy-auth-proxy.socket"
    socket_unit.write_text((ROOT / "systemd" / "legacy-auth-proxy.socket").read_text())
    service = tmp_path / "legacy-auth-proxy.service"
    program = shutil.which("legacy-auth-proxy") or str(Path(sys.executable).parent / "legacy-auth-proxy")
    service.write_text((ROOT / "systemd" / "legacy-auth-proxy.service").read_text()
                       .replace("/usr/bin/legacy-auth-proxy", program))
    done = subprocess.run([analyze, "verify", "--man=no", str(socket_unit)],
                          capture_output=True, text=True, timeout=120)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if "legacy-auth-proxy.socket" in line]
    assert done.returncode == 0 and problems == [], done.stdout + done.stderr


def test_a_listener_on_a_socket_systemd_holds(slapd, tmp_path):
    """Socket activation: systemd-socket-activate holds the port and starts
    the daemon with it (LISTEN_FDS), as the .socket unit does."""
    import signal

    from tests.proxyd import ProxyDaemon, free_port

    activate = require_tool("systemd-socket-activate")
    port = free_port()
    daemon = ProxyDaemon(tmp_path, slapd, {"ldap": {"protocol": "ldap", "realm": "cloud",
                                                    "tls": "none", "allow_plaintext_auth": True}})
    daemon.config.write_text(daemon.config.read_text().replace(
        f"tcp:{daemon.ports['ldap']}:interface=127.0.0.1", "systemd:domain=INET:index=0"))
    process = subprocess.Popen(
        [activate, "-l", f"127.0.0.1:{port}", "--fdname=ldap", "-E", "PYTHONPATH=" + str(ROOT),
         sys.executable, "-m",
         "proxy", "--config", str(daemon.config), "serve"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Once the socket is held, the first connection starts the daemon.
        assert "Listening on" in process.stdout.readline()
        done = subprocess.run([require_tool("ldapwhoami"), "-x", "-H", f"ldap://127.0.0.1:{port}",
                               "-D", slapd.user_dn("nobody"), "-w", "x"], capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 49:  # 49: answered by the proxy
            process.send_signal(signal.SIGTERM)
            raise AssertionError(done.stderr + process.communicate(timeout=30)[0])
    finally:
        process.send_signal(signal.SIGTERM)
        out = process.communicate(timeout=30)[0]
    assert "listening: ldap" in out, out
