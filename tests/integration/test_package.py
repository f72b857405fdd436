"""The Debian package (debian/, docs/packaging.md), built and used on this
machine as an operator would: installed with apt-get, its config checked, its
unit's command run as the unit runs it, its units verified, upgraded from the
build before with a store and an edited config in place, removed, purged.

It installs a package and creates a system user: root only (CI is root). The
two builds (this tree, and a copy whose changelog names an earlier version)
are made once, into a temporary folder.
"""

from __future__ import annotations

import configparser
import grp
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.ports import free_port
from tests.proxyd import Output

ROOT = Path(__file__).resolve().parents[2]
NAME = "legacy-auth-proxy"
VENV = Path("/opt/venvs") / NAME
STATE = Path("/var/lib") / NAME
CONFDIR = Path("/etc") / NAME
LOGDIR = Path("/var/log") / NAME
UNITS = Path("/lib/systemd/system")
PRIMARY = "Primary-Passw0rd"

# Building needs no root; installing does. A machine that already has the
# package is someone's: the test leaves it alone.
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a package: run as root (CI is)"),
    pytest.mark.timeout(900),
]

# Builds see Debian's tools, not the test run's virtual environment.
BUILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root"),
             "LANG": "C.UTF-8", "DEB_BUILD_OPTIONS": "nocheck"}


def run(*command: str, ok: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    if ok:
        assert done.returncode == 0, f"{command}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def apt(*args: str) -> subprocess.CompletedProcess:
    return run("apt-get", "-y", "-q", "--no-install-recommends", *args,
               env={**BUILD_ENV, "DEBIAN_FRONTEND": "noninteractive"})


def build(source: Path) -> Path:
    """dpkg-buildpackage, the documented command, in a copy of the tree."""
    for tool in ("dpkg-buildpackage", "dh", "dh_virtualenv"):
        require_tool(tool)
    run("dpkg-buildpackage", "-us", "-uc", "-b", cwd=source, env=BUILD_ENV)
    version = run("dpkg-parsechangelog", "-S", "Version", cwd=source).stdout.strip()
    arch = run("dpkg", "--print-architecture").stdout.strip()
    deb = source.parent / f"{NAME}_{version}_{arch}.deb"
    assert deb.exists(), sorted(p.name for p in source.parent.iterdir())
    return deb


def copy_tree(into: Path) -> Path:
    """The files git would ship (tracked or new, not ignored), as they are now."""
    files = run("git", "ls-files", "-co", "--exclude-standard", "-z", cwd=ROOT).stdout
    for name in filter(None, files.split("\0")):
        if name.startswith(".venv/") or not (ROOT / name).exists() and not (ROOT / name).is_symlink():
            continue
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=False)
    return into


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """(the build before, this build): the same tree, the first with a
    changelog entry naming an earlier version."""
    if run("dpkg-query", "-W", "-f=${Status}", NAME, ok=False).stdout.startswith("install ok"):
        pytest.skip(f"{NAME} is installed on this machine already; the test would replace it")
    folder = tmp_path_factory.mktemp("package")
    current = copy_tree(folder / "current" / NAME)
    previous = copy_tree(folder / "previous" / NAME)
    version = run("dpkg-parsechangelog", "-S", "Version", cwd=current).stdout.strip()
    changelog = previous / "debian" / "changelog"
    changelog.write_text(
        f"{NAME} ({version}~previous1) unstable; urgency=medium\n\n"
        "  * The build before, for the upgrade test.\n\n"
        f" -- Test <test@example.com>  {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\n\n"
        + changelog.read_text())
    return build(previous), build(current)


@pytest.fixture
def cleanup():
    yield
    if run("dpkg-query", "-W", "-f=${Status}", NAME, ok=False).stdout.startswith("install ok"):
        apt("purge", NAME)


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read(path)
    return parser


def mode_owner(path: Path) -> tuple[str, str, str]:
    info = path.stat()
    return (f"{info.st_mode & 0o7777:04o}", pwd.getpwuid(info.st_uid).pw_name,
            grp.getgrgid(info.st_gid).gr_name)


def operator_config(slapd, port: int) -> str:
    """What an operator makes of the shipped config: the directory, a
    listener, and quick argon2 for a test."""
    shutil.copy(slapd.ca_file, CONFDIR / "directory-ca.pem")
    secret = CONFDIR / "directory-password"
    secret.write_text(slapd.service_password + "\n")
    shutil.chown(secret, NAME, NAME)
    secret.chmod(0o600)
    return f"""# edited by the operator
hashing:
  time_cost: 1
  memory_kib: 1024
directory:
  url: {slapd.url}
  ca_file: {CONFDIR}/directory-ca.pem
  bind_dn: {slapd.service_dn}
  bind_password_file: {secret}
  user_base: {slapd.people_dn}
shutdown:
  grace: 1s
listeners:
  - name: ldap
    protocol: ldap
    realm: on-premises
    endpoint: tcp:{port}:interface=127.0.0.1
    tls: none
    allow_plaintext_auth: true
"""


def start_as_the_unit_does() -> tuple[subprocess.Popen, Output]:
    """The installed unit's ExecStart, as its User and Group, with its
    Environment and UMask and nothing else of ours: systemd is not PID 1 here."""
    service = unit(UNITS / f"{NAME}.service")["Service"]
    user, group = service["User"], service["Group"]
    environment = dict(item.split("=", 1) for item in service["Environment"].split())
    command = service["ExecStart"].split()
    assert command[0] == f"/usr/bin/{NAME}"
    process = subprocess.Popen(
        [require_tool("setpriv"), f"--reuid={user}", f"--regid={group}", "--init-groups",
         "--reset-env", "env", *(f"{k}={v}" for k, v in environment.items()), *command],
        cwd="/", umask=int(service["UMask"], 8), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    return process, Output(process)


def bind(slapd, port: int, dn: str) -> int:
    return run(require_tool("ldapwhoami"), "-x", "-H", f"ldap://127.0.0.1:{port}", "-D", dn,
               "-w", PRIMARY, ok=False).returncode


def test_lintian_finds_nothing_unexplained(packages):
    lintian = require_tool("lintian")
    done = run(lintian, "--fail-on", "none", "--tag-display-limit", "0", str(packages[1]),
               env=BUILD_ENV)
    problems = [line for line in done.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert problems == [], "\n".join(problems)


def test_install_run_upgrade_remove_purge(packages, slapd, unique, cleanup):
    previous, current = packages

    # -- install (the build before) ---------------------------------------
    done = apt("install", str(previous))
    assert "neither enabled nor started" in done.stdout + done.stderr
    account = pwd.getpwnam(NAME)
    assert account.pw_dir == str(STATE) and account.pw_shell.endswith("nologin")
    assert Path(f"/usr/bin/{NAME}").resolve() == VENV / "bin" / NAME
    assert os.readlink(VENV / "bin" / "python3.11") == "/usr/bin/python3.11"
    assert list(VENV.rglob("__pycache__")), "the postinst compiles the venv's byte code"
    assert mode_owner(CONFDIR) == ("0750", "root", NAME)
    assert mode_owner(CONFDIR / "config.yaml") == ("0640", "root", NAME)
    assert mode_owner(STATE) == ("0700", NAME, NAME)
    assert mode_owner(LOGDIR) == ("0750", NAME, NAME)
    keys = {}
    for key in ("pepper", "totp-key"):
        assert mode_owner(STATE / key) == ("0600", NAME, NAME)
        keys[key] = (STATE / key).read_bytes()
        assert len(keys[key]) == 32
    conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", NAME).stdout
    assert f"{CONFDIR}/config.yaml" in conffiles and f"/etc/logrotate.d/{NAME}" in conffiles
    # Neither enabled nor started; an upgrade restarts only a running daemon.
    assert not Path(f"/etc/systemd/system/multi-user.target.wants/{NAME}.service").exists()
    postinst = Path(f"/var/lib/dpkg/info/{NAME}.postinst").read_text()
    assert "deb-systemd-invoke try-restart" in postinst
    assert "deb-systemd-invoke start" not in postinst
    assert "deb-systemd-invoke restart" not in postinst
    prerm = Path(f"/var/lib/dpkg/info/{NAME}.prerm").read_text()
    assert f"deb-systemd-invoke stop {NAME}.socket {NAME}.service" in prerm

    # The shipped config is valid as it stands, for the default path.
    assert "the config is valid" in run(f"/usr/bin/{NAME}", "check-config").stdout

    # The installed units verify, with the installed program.
    for name in (f"{NAME}.service", f"{NAME}.socket"):
        done = run(require_tool("systemd-analyze"), "verify", "--man=no", str(UNITS / name),
                   ok=False)
        problems = [line for line in (done.stdout + done.stderr).splitlines() if NAME in line]
        assert done.returncode == 0 and problems == [], done.stdout + done.stderr

    # -- the operator's config, and a store from the build before ---------
    port = free_port()
    edited = operator_config(slapd, port)
    (CONFDIR / "config.yaml").write_text(edited)
    assert "the config is valid" in run(f"/usr/bin/{NAME}", "check-config").stdout
    # A store at the first schema, as an older release left it.
    run(require_tool("runuser"), "-u", NAME, "--", str(VENV / "bin" / "python"), "-c",
        "import sqlite3, sys\n"
        "from proxy.store.sqlite import MIGRATIONS\n"
        "assert len(MIGRATIONS) > 1\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.executescript(MIGRATIONS[0])\n"
        "db.execute('PRAGMA user_version = 1')\n", str(STATE / "store.sqlite3"))
    (STATE / "store.sqlite3").chmod(0o600)
    done = run(f"/usr/bin/{NAME}", "user", "show", "alice", ok=False)
    assert done.returncode == 78 and "migrate" in done.stderr, done.stderr

    # -- upgrade: the config and keys kept, the schema brought up to date --
    done = apt("install", str(current))
    assert "the store's schema is up to date" in done.stdout + done.stderr, done.stdout + done.stderr
    assert (CONFDIR / "config.yaml").read_text() == edited
    assert mode_owner(CONFDIR / "config.yaml") == ("0640", "root", NAME)
    for key, value in keys.items():
        assert (STATE / key).read_bytes() == value
    with sqlite3.connect(f"file:{STATE / 'store.sqlite3'}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] > 1
    assert list(STATE.glob("store.sqlite3.before-*")), "a copy from before the migration"

    # -- the unit's command, as the unit runs it ----------------------------
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY)
    process, output = start_as_the_unit_does()
    try:
        output.wait_for("listening: ldap", timeout=60)
        assert bind(slapd, port, dn) == 0
        audit = LOGDIR / "audit.log"
        deadline = time.monotonic() + 10
        while uid not in (audit.read_text() if audit.exists() else ""):
            assert time.monotonic() < deadline, "no audit event for the sign-in"
            time.sleep(0.1)
        assert mode_owner(audit)[1:] == (NAME, NAME)
        # logrotate's rule, then what its postrotate's `systemctl reload`
        # does (SIGHUP): the next event goes to a new audit.log.
        run(require_tool("logrotate"), "-f", "-s", str(STATE.parent / "lap-logrotate.state"),
            f"/etc/logrotate.d/{NAME}")
        assert (LOGDIR / "audit.log.1").exists()
        process.send_signal(signal.SIGHUP)
        output.wait_for("config reloaded", timeout=30)
        assert bind(slapd, port, dn) == 0
        deadline = time.monotonic() + 10
        while uid not in (audit.read_text() if audit.exists() else ""):
            assert time.monotonic() < deadline, "the audit log was not opened anew"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        Path(STATE.parent / "lap-logrotate.state").unlink(missing_ok=True)
    assert process.returncode == 0, output.drain(5)

    # -- remove: the program goes, the state stays --------------------------
    apt("remove", NAME)
    assert not Path(f"/usr/bin/{NAME}").exists() and not VENV.exists()
    for path in (CONFDIR / "config.yaml", STATE / "pepper", STATE / "store.sqlite3",
                 LOGDIR / "audit.log"):
        assert path.exists(), path
    pwd.getpwnam(NAME)

    # -- purge: the state and the user go ----------------------------------
    apt("purge", NAME)
    for path in (CONFDIR, STATE, LOGDIR, Path(f"/etc/logrotate.d/{NAME}")):
        assert not path.exists(), path
    with pytest.raises(KeyError):
        pwd.getpwnam(NAME)
    assert NAME not in run("dpkg-statoverride", "--list").stdout
