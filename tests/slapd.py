"""A real OpenLDAP slapd for integration tests.

`Slapd(folder)` writes an old-style slapd.conf, seeds an MDB database with
slapadd and runs slapd in the foreground on two free loopback ports (plain
LDAP with StartTLS, and LDAPS), with a test CA from tests/pki.py.

The directory (suffix dc=example,dc=test) holds:

    ou=people      users, added after start with add_user() so that the
                   memberof overlay sees them join their groups
    ou=groups      cn=mfa, cn=modern-auth-only, cn=admins (groupOfNames)
    ou=services    cn=proxy, the service account the proxy searches with
    ou=policies    cn=default, the ppolicy default policy

The helpers (add_user, set_password, lock, ...) drive the real command line
clients as the rootdn, so what they do is what an administrator would do.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.pki import make_pki
from tests.ports import free_port
from tests.serverlog import ServerLog

SUFFIX = "dc=example,dc=test"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS_OU = f"ou=groups,{SUFFIX}"
SERVICES = f"ou=services,{SUFFIX}"
POLICY_DN = f"cn=default,ou=policies,{SUFFIX}"
GROUPS = ("mfa", "modern-auth-only", "admins")

MODULE_PATH = "/usr/lib/ldap"
SCHEMA_DIR = "/etc/ldap/schema"

# pwdAccountLockedTime with this value means "locked until an administrator
# unlocks it" (draft-behera-ldap-password-policy, slapo-ppolicy(5)).
PERMANENTLY_LOCKED = "000001010000Z"

START_TIMEOUT = 10.0  # a healthy slapd is up in well under a second
STOP_TIMEOUT = 10.0
CLIENT_TIMEOUT = 30.0

# The LDAP message of a WhoAmI extended request (RFC 4532), message id 1:
# SEQUENCE { INTEGER 1, [APPLICATION 23] { [0] "1.3.6.1.4.1.4203.1.11.3" } }.
# Used to probe readiness: unlike a bind it leaves no BIND line in the log.
_WHOAMI_REQUEST = b"\x30\x1e\x02\x01\x01\x77\x19\x80\x17" + b"1.3.6.1.4.1.4203.1.11.3"
# SEQUENCE { INTEGER 2, [APPLICATION 2] NULL }: an UnbindRequest, so that the
# probe's connection ends in the log as "closed", not "connection lost".
_UNBIND_REQUEST = b"\x30\x05\x02\x01\x02\x42\x00"


class SlapdError(RuntimeError):
    """slapd, slapadd or an LDAP client failed; the message has the log tail."""


def ssha(password: str) -> str:
    """A {SSHA} userPassword value, as slappasswd would make it."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def escape_dn_value(value: str) -> str:
    """Escape an attribute value for use in a DN (RFC 4514, section 2.4)."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        elif ch == "\0":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def _ldif_line(attr: str, value: str) -> str:
    """One LDIF attribute line, base64-encoded unless the value is a
    SAFE-STRING (RFC 2849), so any password or name round-trips."""
    safe = (
        value == ""
        or (value.isascii() and value[0] not in " :<" and value[-1] != " "
            and not any(c in value for c in "\0\r\n"))
    )
    if safe:
        return f"{attr}: {value}"
    return f"{attr}:: {base64.b64encode(value.encode()).decode()}"


def _ldif(dn: str, *lines: str) -> str:
    return "\n".join([_ldif_line("dn", dn), *lines]) + "\n\n"


def _find_tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise SlapdError(f"{name} is not installed")
    return path


class Slapd(ServerLog):
    """A slapd serving dc=example,dc=test from `folder`, which holds its
    configuration, database, certificates and log.

    The constructor prepares and seeds the database; start() (or entering
    the context manager) runs slapd, stop() (or leaving it) stops it.
    """

    log_name = "slapd"
    log_error = SlapdError

    host = "127.0.0.1"
    suffix = SUFFIX
    people_dn = PEOPLE
    admin_dn = f"cn=admin,{SUFFIX}"
    admin_password = "admin-secret"
    service_dn = f"cn=proxy,{SERVICES}"
    service_password = "proxy-secret"
    # An account with a user's rights and no more, for app-password sessions
    # (directory.app_password_reads: search_account).
    reader_dn = f"cn=reader,{SERVICES}"
    reader_password = "reader-secret"

    def __init__(self, folder: Path, slapd_bin: str | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.slapd_bin = slapd_bin or _find_tool("slapd")
        self.conf_path = self.folder / "slapd.conf"
        self.data_dir = self.folder / "data"
        self.log_path = self.folder / "slapd.log"
        self.pki = make_pki(self.folder / "pki")
        self.ca_file = self.pki.ca_file
        self.port = free_port()
        self.ldaps_port = free_port()
        self._process: subprocess.Popen | None = None
        self._has_run = False  # once slapd ran, its ports are kept for good
        self._log_offset = 0  # size of the log when slapd was last started
        self._write_config()
        self._seed()

    # -- addresses ----------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ldap://{self.host}:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.host}:{self.ldaps_port}"

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for OpenLDAP clients run by tests: trust the test CA
        and demand a valid certificate for StartTLS (-ZZ) and ldaps://."""
        env = dict(os.environ)
        env.pop("LDAPNOINIT", None)
        env.update({"LDAPTLS_CACERT": str(self.ca_file), "LDAPTLS_REQCERT": "demand", **extra})
        return env

    # -- configuration --------------------------------------------------------

    def _write_config(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        schemas = "\n".join(
            f"include {SCHEMA_DIR}/{name}.schema"
            for name in ("core", "cosine", "inetorgperson", "nis")
        )
        proxy = f'dn.exact="{self.service_dn}"'
        reader = f'dn.exact="{self.reader_dn}"'
        self.conf_path.write_text(f"""\
# Generated by tests/slapd.py for one test session.
{schemas}

modulepath {MODULE_PATH}
moduleload back_mdb
# ppolicy and memberof bring their own schema (pwdPolicy, pwdChangedTime,
# memberOf, ...) in 2.5: there is no ppolicy.schema to include.
moduleload ppolicy
moduleload memberof

pidfile {self.folder}/slapd.pid
argsfile {self.folder}/slapd.args

TLSCACertificateFile {self.pki.ca_file}
TLSCertificateFile {self.pki.cert_file}
TLSCertificateKeyFile {self.pki.key_file}
TLSVerifyClient never

# Passwords set with ldappasswd and hashed by ppolicy_hash_cleartext.
password-hash {{SSHA}}

# RFC 4370 proxied authorization: the service account may act as users
# (authzTo on its entry), as the proxy does for app-password sessions.
authz-policy to

database mdb
suffix "{SUFFIX}"
rootdn "{self.admin_dn}"
rootpw {ssha(self.admin_password)}
directory {self.data_dir}
# A small map (the default is 10 MiB anyway) and no fsync: the data is
# thrown away after the session, and syncing makes every write slow.
maxsize 33554432
dbnosync
index objectClass,uid,cn,member,memberOf eq

# Access control is first match. The rootdn bypasses it altogether.
# Passwords: users may change their own (and so read it: a common rule that
# an app-password session must not inherit from the proxy's accounts);
# anybody may bind with them (auth); nobody else may read the hashes.
access to attrs=userPassword
    by self write
    by anonymous auth
    by * none

# People are a normal directory: every bound user may read them. The
# service account reads everything, including the operational attributes
# the proxy asks for by name (memberOf, pwdChangedTime, pwdAccountLockedTime).
access to dn.subtree="{PEOPLE}"
    by {proxy} read
    by {reader} read
    by users read
    by * none

access to *
    by {proxy} read
    by self read
    by * none

# Overlays run in the reverse order of their declaration; these two do not
# interact, so their order does not matter.

# ppolicy only acts on entries a policy applies to. Without ppolicy_default
# (and no pwdPolicySubentry on the entry) it maintains nothing, not even
# pwdChangedTime, and ignores pwdAccountLockedTime: so a default policy.
overlay ppolicy
ppolicy_default "{POLICY_DN}"
# Cleartext userPassword values in Add and Modify (as opposed to the Password
# Modify extended operation of ldappasswd) are hashed instead of stored as is.
ppolicy_hash_cleartext

# memberOf on the members of groupOfNames groups, updated when members are
# added or removed. refint also drops a deleted user from its groups, so no
# group keeps a dangling member.
overlay memberof
memberof-group-oc groupOfNames
memberof-member-ad member
memberof-memberof-ad memberOf
memberof-refint TRUE
""")

    def _seed(self) -> None:
        """Load the fixed part of the directory with slapadd (slapd in tool
        mode, so that no separate slapadd binary is needed). slapadd runs no
        overlays: entries added here never get memberOf, which is why users
        are added over LDAP once slapd runs."""
        entries = [
            _ldif(SUFFIX, "objectClass: dcObject", "objectClass: organization",
                  "dc: example", "o: Example"),
            *(
                _ldif(f"ou={ou},{SUFFIX}", "objectClass: organizationalUnit", f"ou: {ou}")
                for ou in ("people", "groups", "services", "policies")
            ),
            # pwdLockout must be TRUE for pwdAccountLockedTime to lock the
            # account; pwdMaxFailure 0 means failed binds never lock it by
            # themselves, so tests of wrong passwords do not lock out users.
            # pwdPolicy is auxiliary; slapo-ppolicy(5) suggests namedPolicy as
            # the structural class, but it lives in namedobject.schema, which
            # is not loaded: organizationalRole (core) does the same job.
            _ldif(POLICY_DN, "objectClass: organizationalRole", "objectClass: pwdPolicy",
                  "cn: default", "pwdAttribute: userPassword",
                  "pwdLockout: TRUE", "pwdMaxFailure: 0",
                  "pwdMustChange: FALSE", "pwdAllowUserChange: TRUE"),
            _ldif(self.service_dn, "objectClass: applicationProcess",
                  "objectClass: simpleSecurityObject", "cn: proxy",
                  _ldif_line("userPassword", ssha(self.service_password)),
                  f"authzTo: dn.subtree:{PEOPLE}"),
            _ldif(self.reader_dn, "objectClass: applicationProcess",
                  "objectClass: simpleSecurityObject", "cn: reader",
                  _ldif_line("userPassword", ssha(self.reader_password))),
            # groupOfNames must have a member. The placeholder is the rootdn,
            # which has no entry: memberof ignores it (memberof-dangling
            # defaults to ignore) and it can never be a user nor the service
            # account, so nobody gets a stray memberOf from it.
            *(
                _ldif(self.group_dn(group), "objectClass: groupOfNames", f"cn: {group}",
                      _ldif_line("member", self.admin_dn))
                for group in GROUPS
            ),
        ]
        seed = self.folder / "seed.ldif"
        seed.write_text("".join(entries))
        result = subprocess.run(
            [self.slapd_bin, "-T", "add", "-f", str(self.conf_path), "-l", str(seed), "-q"],
            capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
        )
        if result.returncode != 0:
            raise SlapdError(f"slapadd failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    # -- process --------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Run slapd and wait until it answers. After the first successful
        start the ports are fixed: clients keep using the same URLs."""
        if self.running:
            return
        attempts = 1 if self._has_run else 3
        for attempt in range(attempts):
            try:
                self._start_once()
            except SlapdError:
                # Only a lost race for the ports is worth another try.
                in_use = "Address already in use" in self._log_since(self._log_offset)
                if attempt + 1 == attempts or not in_use:
                    raise
                self.port, self.ldaps_port = free_port(), free_port()
            else:
                self._has_run = True
                return

    def _start_once(self) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            # -d 256 (stats) keeps slapd in the foreground and logs every
            # connection, operation (BIND dn=..., SRCH, MOD ...) and RESULT
            # to stderr, which goes to the log file.
            self._process = subprocess.Popen(
                [self.slapd_bin, "-f", str(self.conf_path),
                 "-h", f"{self.url}/ {self.ldaps_url}/", "-d", "256"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise SlapdError(f"slapd exited with status {code} while starting\n{self._tail()}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self._kill()
                raise SlapdError(f"slapd did not answer on {self.url} within "
                                 f"{START_TIMEOUT:.0f} s\n{self._tail()}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        """Whether slapd answers an LDAP request on the plain port. It only
        listens once its database is open, but a reply is proof it serves."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.sendall(_WHOAMI_REQUEST)
                reply = s.recv(256)
                with contextlib.suppress(OSError):
                    s.sendall(_UNBIND_REQUEST)
        except OSError:  # refused (not listening yet), reset or timed out
            return False
        # An LDAPMessage whose ExtendedResponse ([APPLICATION 24]) has
        # resultCode success (ENUMERATED 0).
        return reply[:1] == b"\x30" and b"\x78" in reply and b"\x0a\x01\x00" in reply

    def stop(self) -> None:
        """Stop slapd (SIGTERM, it then closes its database cleanly)."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._kill()
                raise SlapdError(f"slapd did not stop within {STOP_TIMEOUT:.0f} s\n{self._tail()}")
        self._process = None

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- directory administration ----------------------------------------------

    def _client(self, tool: str, *args: str, ldif: str | None = None) -> str:
        """Run an OpenLDAP client as the rootdn against the plain port."""
        command = [_find_tool(tool), "-x", "-H", self.url,
                   "-D", self.admin_dn, "-w", self.admin_password, *args]
        # LDAPNOINIT: ignore ldap.conf and ~/.ldaprc of the machine running
        # the tests.
        env = {**os.environ, "LDAPNOINIT": "1"}
        result = subprocess.run(command, input=ldif, capture_output=True, text=True,
                                env=env, timeout=CLIENT_TIMEOUT)
        if result.returncode != 0:
            raise SlapdError(
                f"{tool} {' '.join(args)} failed with status {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n{ldif or ''}{self._tail()}"
            )
        return result.stdout

    def _modify(self, dn: str, *lines: str) -> None:
        self._client("ldapmodify", ldif=_ldif(dn, "changetype: modify", *lines))

    def user_dn(self, uid: str) -> str:
        return f"uid={escape_dn_value(uid)},{PEOPLE}"

    def group_dn(self, group: str) -> str:
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; the groups are {', '.join(GROUPS)}")
        return f"cn={group},{GROUPS_OU}"

    def add_user(self, uid: str, password: str, *, mail: str | None = None,
                 groups=(), locked: bool = False) -> str:
        """Add uid=<uid>,ou=people as inetOrgPerson, member of `groups`
        (names among GROUPS), optionally locked. Returns its DN."""
        dn = self.user_dn(uid)
        group_dns = [self.group_dn(g) for g in groups]  # validate before adding
        self._client("ldapadd", ldif=_ldif(
            dn, "objectClass: inetOrgPerson",
            _ldif_line("uid", uid), _ldif_line("cn", uid), _ldif_line("sn", uid),
            _ldif_line("mail", mail if mail is not None else f"{uid}@example.test"),
            _ldif_line("userPassword", ssha(password)),
        ))
        for group_dn in group_dns:
            self._modify(group_dn, "add: member", _ldif_line("member", dn), "-")
        if locked:
            self.lock(dn)
        return dn

    def delete(self, dn: str) -> None:
        """Delete an entry (memberof-refint drops it from its groups)."""
        self._client("ldapdelete", dn)

    def set_password(self, dn: str, new_password: str) -> None:
        """Change a password with the Password Modify extended operation, as
        the rootdn; ppolicy sets pwdChangedTime."""
        # In a file (-T, read as is) rather than on the command line (-s);
        # mkstemp creates it 0600 with a name no other call uses.
        fd, secret = tempfile.mkstemp(prefix="new-password.", dir=self.folder)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new_password)
            self._client("ldappasswd", "-T", secret, dn)
        finally:
            os.unlink(secret)

    def lock(self, dn: str) -> None:
        """Lock the account until unlock() (binds fail with error 49)."""
        self._modify(dn, "replace: pwdAccountLockedTime",
                     f"pwdAccountLockedTime: {PERMANENTLY_LOCKED}", "-")

    def unlock(self, dn: str) -> None:
        # replace with no values: removes the attribute, and is no error when
        # the account was not locked.
        self._modify(dn, "replace: pwdAccountLockedTime", "-")

    def add_to_group(self, dn: str, group: str) -> None:
        self._modify(self.group_dn(group), "add: member", _ldif_line("member", dn), "-")

    def remove_from_group(self, dn: str, group: str) -> None:
        self._modify(self.group_dn(group), "delete: member", _ldif_line("member", dn), "-")

    def search(self, base: str, filter: str = "(objectClass=*)", *attrs: str,
               scope: str = "base") -> list[dict[str, list[str]]]:
        """ldapsearch as the rootdn (no access control): the entries found,
        parsed by parse_ldif. An error if `base` does not exist."""
        return parse_ldif(self._client("ldapsearch", "-LLL", "-o", "ldif-wrap=no",
                                       "-b", base, "-s", scope, filter, *attrs))


def parse_ldif(text: str) -> list[dict[str, list[str]]]:
    """Entries printed by `ldapsearch -LLL -o ldif-wrap=no`, as
    {attribute: [values]} with "dn" among the attributes. Base64 values
    (ldapsearch always encodes userPassword) are decoded."""
    entries = []
    for block in text.strip().split("\n\n"):
        entry: dict[str, list[str]] = {}
        for line in block.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(":"):
                value = base64.b64decode(value[1:].strip()).decode(errors="replace")
            else:
                value = value.strip()
            entry.setdefault(name, []).append(value)
        if entry:
            entries.append(entry)
    return entries
