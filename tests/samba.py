"""A real Active Directory domain controller for integration tests: Samba's.

`Samba(folder)` provisions a domain (``samba-tool domain provision``, about
5 s), then runs ``samba`` in the foreground, single process, serving LDAP
(StartTLS) and LDAPS on loopback only. A DC serves the standard ports (389,
636): there is one per test session, and if another process holds them
the fixture fails and says so rather than testing someone else's server.

The domain (realm AD.EXAMPLE.TEST, NetBIOS name EXAMPLE) holds:

    OU=People      users, made with add_user() as an administrator would
    OU=Groups      mfa, modern-auth-only, admins (global security groups)
    OU=Services    CN=proxy-svc, the service account: a plain domain user,
                   no rights beyond what every authenticated user has

The DC's certificate comes from the tests' CA (tests/pki.py), named for
localhost and 127.0.0.1, through smb.conf's ``tls certfile``: the
certificate Samba makes by itself names only its host in the subject, with
no subjectAltName, which no client that checks names (the proxy among
them) accepts. Its password policy: no complexity, no history, no expiry,
accounts locked by AD after LOCKOUT_THRESHOLD wrong passwords for 30
minutes.

Helpers act on the DC's own database with samba-tool and ldbmodify (what
an administrator does on a DC); the changes are seen at once over LDAP.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.pki import make_pki
from tests.slapd import parse_ldif

REALM = "AD.EXAMPLE.TEST"
NETBIOS = "EXAMPLE"
DOMAIN_DN = "DC=ad,DC=example,DC=test"
PEOPLE = f"OU=People,{DOMAIN_DN}"
GROUPS_OU = f"OU=Groups,{DOMAIN_DN}"
SERVICES = f"OU=Services,{DOMAIN_DN}"
GROUPS = ("mfa", "modern-auth-only", "admins")
ADMIN_PASSWORD = "Administrator-Passw0rd"
LOCKOUT_THRESHOLD = 5

PORTS = (389, 636)
# Limits for a broken DC, not for timing: on a loaded machine (two cores
# shared by several suites) provisioning has taken over a minute, and the
# first answer over 20 s.
START_TIMEOUT = 180.0  # up in about 3 s when the machine is idle
TOOL_TIMEOUT = 300.0

# accountExpires and the like: 100 ns ticks since 1601-01-01.
EPOCH_TICKS = 116_444_736_000_000_000


def ticks(seconds: float) -> int:
    return int(seconds * 10_000_000) + EPOCH_TICKS


class SambaError(RuntimeError):
    """samba, samba-tool or an LDAP client failed; the message says how."""


def _tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        raise SambaError(f"{name} is not installed (tests/run installs it)")
    return path


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


class Samba:
    """One Samba AD DC in ``folder``; ``start()``, ``stop()``."""

    host = "127.0.0.1"
    netbios = NETBIOS
    realm = REALM
    dns_domain = REALM.lower()
    domain_dn = DOMAIN_DN
    people_dn = PEOPLE
    service_dn = f"CN=proxy-svc,{SERVICES}"
    service_password = "Service-Passw0rd"
    admin_dn = f"CN=Administrator,CN=Users,{DOMAIN_DN}"
    admin_password = ADMIN_PASSWORD
    lockout_threshold = LOCKOUT_THRESHOLD

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.target = self.folder / "dc"
        self.conf = self.target / "etc" / "smb.conf"
        self.sam = self.target / "private" / "sam.ldb"
        self.pki = make_pki(self.folder / "pki")
        self.pki.key_file.chmod(0o600)  # Samba refuses a key others may read
        self.ca_file = self.pki.ca_file
        self.log_path = self.folder / "samba.log"
        self._process: subprocess.Popen | None = None
        self._log_offset = 0
        self._provisioned = False

    # -- addresses --------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ldap://{self.host}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.host}"

    def client_env(self) -> dict[str, str]:
        # Not LDAPNOINIT: it would make libldap ignore these too.
        env = {k: v for k, v in os.environ.items() if k != "LDAPNOINIT"}
        env.update(LDAPTLS_CACERT=str(self.ca_file), LDAPTLS_REQCERT="demand")
        return env

    # -- life -----------------------------------------------------------------

    def provision(self) -> None:
        options = {
            "interfaces": "lo", "bind interfaces only": "yes",
            # LDAP only: no SMB, RPC, NetBIOS, DNS or KDC ports taken.
            "server services": "ldap",
            "tls enabled": "yes",
            "tls certfile": str(self.pki.cert_file),
            "tls keyfile": str(self.pki.key_file),
            "tls cafile": str(self.pki.ca_file),
            "log file": str(self.folder / "log.%m"),
        }
        self._run(
            _tool("samba-tool"), "domain", "provision", "--server-role=dc",
            # SAMBA_INTERNAL for the DomainDnsZones and ForestDnsZones
            # partitions a real domain has (searches from the domain's root
            # get references to them); no DNS server runs ("server services").
            "--dns-backend=SAMBA_INTERNAL", f"--targetdir={self.target}", f"--realm={REALM}",
            f"--domain={NETBIOS}", "--host-name=dc1", f"--adminpass={ADMIN_PASSWORD}",
            *(f"--option={k}={v}" for k, v in options.items()),
        )
        self.samba_tool("domain", "passwordsettings", "set", "--complexity=off",
                        "--history-length=0", "--min-pwd-age=0", "--max-pwd-age=0",
                        f"--account-lockout-threshold={LOCKOUT_THRESHOLD}",
                        "--account-lockout-duration=30", "--reset-account-lockout-after=30")
        # One ldbadd rather than a samba-tool run (a second or two) for each.
        ldif = [f"dn: OU={ou},{DOMAIN_DN}\nobjectClass: organizationalUnit\n"
                for ou in ("People", "Groups", "Services")]
        ldif += [f"dn: {self.group_dn(g)}\nobjectClass: group\nsAMAccountName: {g}\n"
                 for g in GROUPS]
        self._run(_tool("ldbadd"), "-H", str(self.sam), f"--configfile={self.conf}",
                  input="\n".join(ldif))
        self.samba_tool("user", "create", "proxy-svc", self.service_password,
                        "--userou=OU=Services")
        self._provisioned = True

    def start(self) -> None:
        taken = [p for p in PORTS if port_taken(p)]
        if taken:
            raise SambaError(
                f"port(s) {', '.join(map(str, taken))} on 127.0.0.1 are taken by another "
                "process: the Samba DC serves LDAP on the standard ports, so the Active "
                "Directory tests need them free (is another Samba or slapd running?)")
        if not self._provisioned:
            self.provision()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [_tool("samba"), "-s", str(self.conf), "-M", "single", "-i",
                 "--debug-stdout"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise SambaError(f"samba exited at start:\n{self._tail()}")
            if self._answers():
                return
            time.sleep(0.2)
        self.stop()
        raise SambaError(f"samba did not answer on LDAPS within {START_TIMEOUT:g} s:\n"
                         f"{self._tail()}")

    def _answers(self) -> bool:
        return self.bind(self.service_dn, self.service_password).returncode == 0

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._process = None
        # The ports are free once the process is gone; wait for it to show.
        deadline = time.monotonic() + 10
        while any(port_taken(p) for p in PORTS) and time.monotonic() < deadline:
            time.sleep(0.1)

    def _tail(self, lines: int = 40) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])

    # -- administration ---------------------------------------------------------

    def _run(self, *command: str, input: str | None = None) -> str:
        result = subprocess.run(command, input=input, capture_output=True, text=True,
                                timeout=TOOL_TIMEOUT, env=self.client_env())
        if result.returncode != 0:
            raise SambaError(f"{' '.join(command[:4])} ... failed with status "
                             f"{result.returncode}:\n{result.stdout}{result.stderr}")
        return result.stdout

    def samba_tool(self, *args: str) -> str:
        return self._run(_tool("samba-tool"), *args, "-H", str(self.sam),
                         f"--configfile={self.conf}")

    def ldbadd(self, ldif: str) -> None:
        """Entries added to the DC's database at once (a thousand in seconds)."""
        self._run(_tool("ldbadd"), "-H", str(self.sam), f"--configfile={self.conf}", input=ldif)

    def ldbmodify(self, dn: str, *lines: str) -> None:
        ldif = "\n".join([f"dn: {dn}", "changetype: modify", *lines]) + "\n"
        self._run(_tool("ldbmodify"), "-H", str(self.sam), f"--configfile={self.conf}",
                  input=ldif)

    def search(self, base: str, *attributes: str, filter: str = "(objectClass=*)",
               scope: str = "base") -> list[dict[str, list[str]]]:
        """ldbsearch on the DC's database (no access control): the entries."""
        out = self._run(_tool("ldbsearch"), "-H", str(self.sam), f"--configfile={self.conf}",
                        "-b", base, "-s", scope, filter, *attributes)
        return parse_ldif("\n".join(line for line in out.splitlines()
                                    if not line.startswith("#")
                                    and not line.startswith("ref:")))

    def attribute(self, dn: str, name: str) -> str | None:
        entries = self.search(dn, name)
        for key, values in entries[0].items():
            if key.lower() == name.lower():
                return values[0]
        return None

    def user_dn(self, sam: str) -> str:
        return f"CN={sam},{PEOPLE}"

    def group_dn(self, group: str) -> str:
        return f"CN={group},{GROUPS_OU}"

    def add_group(self, group: str, *members: str) -> str:
        self.samba_tool("group", "add", group, "--groupou=OU=Groups")
        if members:
            self.add_to_group(group, *members)
        return self.group_dn(group)

    def add_user(self, sam: str, password: str, *, mail: str | None = None,
                 upn: str | None = None, groups=(), disabled: bool = False) -> str:
        """A user in OU=People (sAMAccountName ``sam``; UPN sam@ad.example.test
        unless ``upn``), member of ``groups`` (sAMAccountNames of groups, or
        of users' groups made with add_group). Returns its DN."""
        self.samba_tool("user", "create", sam, password, "--userou=OU=People",
                        f"--mail-address={mail or f'{sam}.mail@example.test'}")
        dn = self.user_dn(sam)
        if upn is not None:
            self.ldbmodify(dn, "replace: userPrincipalName", f"userPrincipalName: {upn}")
        for group in groups:
            self.add_to_group(group, sam)
        if disabled:
            self.disable(sam)
        return dn

    def add_to_group(self, group: str, *members: str) -> None:
        self.samba_tool("group", "addmembers", group, ",".join(members))

    def delete(self, sam: str) -> None:
        self.samba_tool("user", "delete", sam)

    def disable(self, sam: str) -> None:
        self.samba_tool("user", "disable", sam)

    def enable(self, sam: str) -> None:
        self.samba_tool("user", "enable", sam)

    def set_password(self, sam: str, password: str, *, must_change: bool = False) -> None:
        self.samba_tool("user", "setpassword", sam, f"--newpassword={password}",
                        *(["--must-change-at-next-login"] if must_change else []))

    def set_account_expires(self, sam: str, when: float | None) -> None:
        """accountExpires at ``when`` (POSIX seconds; None: never)."""
        value = 0x7FFFFFFFFFFFFFFF if when is None else ticks(when)
        self.ldbmodify(self.user_dn(sam), "replace: accountExpires", f"accountExpires: {value}")

    def set_primary_group(self, sam: str, group: str) -> None:
        """Make ``group`` the user's primary group: memberOf no longer lists it."""
        rid = self.search(self.group_dn(group), "objectSid")[0]["objectSid"][0].rsplit("-", 1)[1]
        self.add_to_group(group, sam)  # AD makes only a group one is in primary
        self.ldbmodify(self.user_dn(sam), "replace: primaryGroupID", f"primaryGroupID: {rid}")

    def bind(self, dn: str, password: str) -> subprocess.CompletedProcess:
        """A simple bind over LDAPS as a client of the DC would make it, then
        a read of the root DSE (Samba has no WhoAmI)."""
        return subprocess.run(
            [_tool("ldapsearch"), "-x", "-H", self.ldaps_url, "-D", dn, "-w", password,
             "-b", "", "-s", "base", "(objectClass=*)", "1.1"],
            env=self.client_env(), capture_output=True, text=True, timeout=TOOL_TIMEOUT)

    def lock_by_wrong_passwords(self, sam: str) -> None:
        """Lock the account as AD does: LOCKOUT_THRESHOLD wrong passwords."""
        for i in range(LOCKOUT_THRESHOLD):
            self.bind(self.user_dn(sam), f"wrong-{i}")

    def unlock(self, sam: str) -> None:
        self.samba_tool("user", "unlock", sam)

    def bad_password_count(self, sam: str) -> int:
        return int(self.attribute(self.user_dn(sam), "badPwdCount") or 0)

    def lockout_time(self, sam: str) -> int:
        return int(self.attribute(self.user_dn(sam), "lockoutTime") or 0)
