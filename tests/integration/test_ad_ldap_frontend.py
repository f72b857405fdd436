"""The LDAP front end in front of Active Directory, end to end: the real
daemon (tests/proxyd.py) with ``directory.kind: active_directory`` before
Samba's AD DC (tests/samba.py), driven by OpenLDAP's ldapsearch and
ldapwhoami and by ldap3, each compared with the same client bound directly
to the DC.

App-password sessions read as the search account, named as AD
administrators name such accounts (``CN=LDAP Proxy,OU=Service Accounts``),
a plain domain user; primary-password sessions read as the user.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import time

import ldap3
import pytest

from tests.conftest import audit_text, require_tool
from tests.integration.test_ldap_frontend import connection
from tests.proxyd import ProxyDaemon
from tests.samba import DOMAIN_DN

PRIMARY = "Primary-Passw0rd"
SEARCH_DN = f"CN=LDAP Proxy,OU=Service Accounts,{DOMAIN_DN}"
SEARCH_PASSWORD = "Search-Passw0rd"
BULK_OU = f"OU=Bulk,{DOMAIN_DN}"
BULK = 1200  # beyond AD's page size of 1,000
# A secret the DC lets every authenticated user read (AD and Samba keep
# userPassword as a plain attribute unless dSHeuristics says otherwise).
READABLE_SECRET = "Readable-Secret-1"
# What the DC changes by itself between two reads of the same entry.
VOLATILE = ("lastLogon:", "lastLogonTimestamp:", "logonCount:", "badPasswordTime:",
            "badPwdCount:", "whenChanged:", "uSNChanged:")


@pytest.fixture(scope="module")
def dc(samba):
    """The DC with the search account and more than a page of entries."""
    samba.ldbadd(f"dn: OU=Service Accounts,{DOMAIN_DN}\nobjectClass: organizationalUnit\n")
    samba.samba_tool("user", "create", "ldap-proxy", SEARCH_PASSWORD,
                     "--userou=OU=Service Accounts", "--given-name=LDAP", "--surname=Proxy")
    assert samba.search(SEARCH_DN, "sAMAccountName")[0]["sAMAccountName"] == ["ldap-proxy"]
    bulk = [f"dn: {BULK_OU}\nobjectClass: organizationalUnit\n"]
    bulk += [f"dn: CN=c{i:05d},{BULK_OU}\nobjectClass: contact\ndescription: bulk {i}\n"
             for i in range(BULK)]
    samba.ldbadd("\n".join(bulk))
    return samba


@pytest.fixture(scope="module")
def proxy(dc, tmp_path_factory):
    require_tool("ldapwhoami")
    folder = tmp_path_factory.mktemp("proxy-ad-ldap")
    secret = folder / "search-password"
    secret.write_text(SEARCH_PASSWORD + "\n")
    secret.chmod(0o600)
    daemon = ProxyDaemon(folder, dc, {
        "cloud": {"protocol": "ldap", "realm": "cloud"},
        "onprem": {"protocol": "ldap", "realm": "on-premises"},
    }, directory="\n".join([
        "  kind: active_directory",
        f"  search_bind_dn: {json.dumps(SEARCH_DN)}",
        f"  search_bind_password_file: {secret}",
        # For a DC that does not answer, not a timing: it serves one request
        # at a time, slowly on a loaded machine.
        "  timeout: 15s",
    ]))
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture
def user(dc, proxy, unique):
    """A user of the DC (password PRIMARY) with an app password and a
    userPassword every authenticated user may read: (sam, dn, app password)."""
    sam = unique("ad")
    dn = dc.add_user(sam, PRIMARY)
    dc.ldbmodify(dn, "replace: userPassword", f"userPassword: {READABLE_SECRET}")
    return sam, dn, proxy.create_app_password(sam, "printer")


def search(env, url, name, password, *args, starttls=True):
    """ldapsearch's LDIF, unwrapped, with references and paging shown."""
    require_tool("ldapsearch")
    command = ["ldapsearch", "-x", "-H", url, *(["-ZZ"] if starttls else []), "-D", name,
               "-w", password, "-o", "ldif-wrap=no", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def through(proxy, listener, name, password, *args):
    return search(proxy.env(), f"ldap://127.0.0.1:{proxy.ports[listener]}", name, password,
                  *args)


def direct(dc, name, password, *args):
    return search(dc.client_env(), dc.url, name, password, *args)


def entries(ldif: str) -> dict[str, list[str]]:
    """The entries of ldapsearch's output: DN -> its lines, in order, without
    what the DC changes by itself."""
    out = {}
    for block in ldif.strip().split("\n\n"):
        lines = [line for line in block.splitlines() if not line.startswith("#")]
        if lines and lines[0].startswith("dn: "):
            out[lines[0][4:]] = [line for line in lines[1:] if not line.startswith(VOLATILE)]
    return out


def references(ldif: str) -> list[str]:
    return re.findall(r"^ref: (\S+)", ldif, re.MULTILINE)


def cookies(ldif: str) -> list[str]:
    return re.findall(r"^pagedresults: cookie=(\S*)", ldif, re.MULTILINE)


SECRET = re.compile(r"^(userPassword|unicodePwd|supplementalCredentials|msDS-\w*Password\w*|"
                    r"ms-Mcs-AdmPwd|msLAPS-\w+|dBCSPwd|lmPwdHistory|ntPwdHistory)::? ",
                    re.IGNORECASE)


def without_secrets(found: dict[str, list[str]]) -> dict[str, list[str]]:
    return {dn: [line for line in lines if not SECRET.match(line)] for dn, lines in found.items()}


# -- what an app-password session reads --------------------------------------------------


def test_an_app_password_session_reads_what_the_user_reads_less_secrets(proxy, dc, user):
    sam, dn, secret = user
    # The whole domain, every attribute, paged (AD pages at 1,000).
    what = ["-b", DOMAIN_DN, "-E", "pr=500/noprompt", "(objectClass=*)", "*", "+"]
    as_user = direct(dc, dn, PRIMARY, *what)
    assert as_user.returncode == 0, as_user.stderr
    as_app = through(proxy, "cloud", sam, secret, *what)
    assert as_app.returncode == 0, as_app.stderr
    expected, got = entries(as_user.stdout), entries(as_app.stdout)
    assert len(expected) > BULK
    # The DC gives the user a readable secret, and the proxy does not.
    assert "userPassword:: " in "\n".join(expected[dn])
    assert not any(SECRET.match(line) for lines in got.values() for line in lines)
    # The reading accounts' own entries are hidden, whatever their DNs look like.
    hidden = {SEARCH_DN, dc.service_dn}
    assert hidden <= set(expected) and not hidden & set(got)
    assert got == without_secrets({k: v for k, v in expected.items() if k not in hidden})
    # Signed in with the primary password, the user reads as themself: all of it.
    as_primary = through(proxy, "onprem", sam, PRIMARY, *what)
    assert as_primary.returncode == 0, as_primary.stderr
    assert entries(as_primary.stdout) == expected


def test_secrets_asked_for_by_name_are_not_asked_for(proxy, dc, user):
    sam, dn, secret = user
    for asked in (["userPassword"], ["userPassword", "unicodePwd", "cn"],
                  ["2.5.4.35", "supplementalCredentials", "msDS-ManagedPassword"]):
        done = through(proxy, "cloud", sam, secret, "-LLL", "-b", dn, "-s", "base",
                       "(objectClass=*)", *asked)
        assert done.returncode == 0, done.stderr
        assert entries(done.stdout) == {dn: [f"cn: {sam}"] if "cn" in asked else []}, asked
    # The DC would have answered the first: the proxy asked it for none.
    assert "userPassword" in direct(dc, dn, PRIMARY, "-LLL", "-b", dn, "-s", "base",
                                    "(objectClass=*)", "userPassword").stdout
    # A filter on a secret is a password check: refused, and audited.
    done = through(proxy, "cloud", sam, secret, "-b", DOMAIN_DN,
                   f"(userPassword={READABLE_SECRET[:3]}*)", "dn")
    assert done.returncode == 50, done.stdout + done.stderr
    assert "cannot search by password attributes" in done.stdout
    assert refusals_of(proxy, sam) == ["password_filter"]


def refusals_of(proxy, sam, timeout=10.0):
    """The reasons of the user's session_refusal events (written just after
    the answer: polled for)."""
    deadline = time.monotonic() + timeout
    while True:
        events = [json.loads(line) for line in
                  audit_text(proxy.folder / "audit.log").splitlines()
                  if '"session_refusal"' in line]
        reasons = [e["reason"] for e in events if e["user"] == sam]
        if reasons or time.monotonic() > deadline:
            return reasons
        time.sleep(0.1)


def test_the_reading_accounts_are_nobody_to_an_app_password_session(proxy, dc, user):
    sam, _, secret = user
    conn = connection(proxy, "cloud", sam, secret)
    assert conn.bind(), conn.result
    for base, query in ((SEARCH_DN, "(objectClass=*)"), (dc.service_dn, "(objectClass=*)"),
                        (DOMAIN_DN, "(|(cn=LDAP Proxy)(sAMAccountName=proxy-svc))"),
                        (f"OU=Service Accounts,{DOMAIN_DN}", "(objectClass=user)")):
        conn.search(base, query, attributes=["cn"])
        assert conn.result["result"] == 0 and conn.entries == [], base
    conn.unbind()
    # The user, signed in with the primary password, reads as themself.
    conn = connection(proxy, "cloud", sam, PRIMARY)
    assert conn.bind(), conn.result
    conn.search(SEARCH_DN, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["cn"])
    assert [e.entry_dn for e in conn.entries] == [SEARCH_DN]
    conn.unbind()


def test_who_am_i_names_the_user_and_writes_are_refused(proxy, dc, user):
    sam, dn, secret = user
    for name in (sam, f"EXAMPLE\\{sam}", f"{sam}@ad.example.test"):
        done = subprocess.run(
            ["ldapwhoami", "-x", "-ZZ", "-H", f"ldap://127.0.0.1:{proxy.ports['cloud']}",
             "-D", name, "-w", secret], capture_output=True, text=True, env=proxy.env(),
            timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == f"dn:{dn}", done.stderr
    conn = connection(proxy, "cloud", sam, secret)
    assert conn.bind()
    conn.modify(dn, {"description": [(ldap3.MODIFY_REPLACE, ["x"])]})
    assert conn.result["result"] == 50
    conn.unbind()


# -- paged results beyond AD's page size --------------------------------------------------


@pytest.mark.parametrize("kind", ["app_password", "primary"])
def test_ldapsearch_pages_through_more_than_a_thousand_entries(proxy, dc, user, kind):
    sam, _, secret = user
    password = secret if kind == "app_password" else PRIMARY
    done = through(proxy, "cloud", sam, password, "-b", BULK_OU, "-E", "pr=500/noprompt",
                   "(objectClass=contact)", "description")
    assert done.returncode == 0, done.stderr
    found = entries(done.stdout)
    assert len(found) == BULK
    assert {lines[0] for lines in found.values()} == {f"description: bulk {i}" for i in range(BULK)}
    # Three pages (ldapsearch shows the last: message 5, after StartTLS's
    # 1 and the bind's 2): each cookie went back to the DC; the last is empty.
    assert re.search(r"^search: 5$", done.stdout, re.MULTILINE), done.stdout[-400:]
    assert cookies(done.stdout) == [""]


@pytest.mark.parametrize("kind", ["app_password", "primary"])
def test_ldap3_pages_with_the_cookie_round_trip(proxy, dc, user, kind):
    sam, _, secret = user
    conn = connection(proxy, "cloud", sam, secret if kind == "app_password" else PRIMARY)
    assert conn.bind(), conn.result
    found = list(conn.extend.standard.paged_search(
        BULK_OU, "(objectClass=contact)", attributes=["cn"], paged_size=500, generator=True))
    names = [e["dn"] for e in found if e["type"] == "searchResEntry"]
    assert len(names) == len(set(names)) == BULK
    # By hand: the cookie of the first page brings the second, not the first again.
    conn.search(BULK_OU, "(objectClass=contact)", attributes=["cn"], paged_size=700)
    first = {e.entry_dn for e in conn.entries}
    cookie = conn.result["controls"]["1.2.840.113556.1.4.319"]["value"]["cookie"]
    assert len(first) == 700 and cookie
    conn.search(BULK_OU, "(objectClass=contact)", attributes=["cn"], paged_size=700,
                paged_cookie=cookie)
    second = {e.entry_dn for e in conn.entries}
    assert len(second) == BULK - 700 and not first & second
    assert not conn.result["controls"]["1.2.840.113556.1.4.319"]["value"]["cookie"]
    # Unpaged, the DC sends them all (Samba does not hold to MaxPageSize), and so does the proxy.
    conn.search(BULK_OU, "(objectClass=contact)", attributes=["cn"])
    assert conn.result["result"] == 0 and len(conn.entries) == BULK
    conn.unbind()


# -- references and referrals -------------------------------------------------------------


PARTITIONS = ("CN=Configuration", "DC=DomainDnsZones", "DC=ForestDnsZones")


@pytest.mark.parametrize("chase", [False, True], ids=["plain", "chasing"])
def test_references_from_the_domain_root(proxy, dc, user, chase):
    """The DC answers a subtree search from the domain's root with
    references to its other partitions: an app-password session never
    gets them (each points around the proxy, to the DC); a primary-password
    session gets them as the DC sent them. ldapsearch with -C (chase) or
    without, finishes at once either way."""
    sam, dn, secret = user
    what = [*(["-C"] if chase else []), "-b", DOMAIN_DN, f"(sAMAccountName={sam})", "cn"]
    at_dc = direct(dc, dn, PRIMARY, *what)
    assert at_dc.returncode == 0, at_dc.stderr
    assert sorted(r.split("/", 3)[3].split(",")[0] for r in references(at_dc.stdout)) == \
        sorted(PARTITIONS)
    as_app = through(proxy, "cloud", sam, secret, *what)
    assert as_app.returncode == 0, as_app.stderr
    assert list(entries(as_app.stdout)) == [dn] and references(as_app.stdout) == []
    assert "# numReferences" not in as_app.stdout
    as_user = through(proxy, "cloud", sam, PRIMARY, *what)
    assert as_user.returncode == 0, as_user.stderr
    assert list(entries(as_user.stdout)) == [dn]
    assert sorted(references(as_user.stdout)) == sorted(references(at_dc.stdout))


def test_ldap3_following_referrals_never_leaves_the_proxy(proxy, dc, user):
    """ldap3 follows references by default, binding where they point with
    the same password: an app password would reach the DC. It gets none."""
    sam, dn, secret = user
    before = dc.bad_password_count(sam)
    conn = connection(proxy, "cloud", sam, secret)
    assert conn.bind()
    conn.search(DOMAIN_DN, f"(sAMAccountName={sam})", attributes=["cn"])
    assert conn.result["result"] == 0 and [e.entry_dn for e in conn.entries] == [dn]
    assert conn.response and all(r["type"] == "searchResEntry" for r in conn.response)
    conn.unbind()
    assert dc.bad_password_count(sam) == before
    # (A base outside the DC's partitions: Samba answers noSuchObject where
    # a Windows DC sends a referral, which the proxy answers as noSuchObject:
    # tests/unit/test_ldap_secrets.py.)


# -- what it costs -------------------------------------------------------------------------


def test_timing_of_paging_through_the_proxy_and_at_the_dc(proxy, dc, user):
    """Measured, not judged: printed for docs/active-directory.md (-s). The
    median of five runs of ldapsearch (a process, StartTLS, a bind, three
    pages of 1,200 entries) at the DC and through the proxy."""
    sam, dn, secret = user
    what = ["-b", BULK_OU, "-E", "pr=500/noprompt", "(objectClass=contact)", "description"]
    runs = {
        "at the DC, as the user": lambda: direct(dc, dn, PRIMARY, *what),
        "through the proxy, app password": lambda: through(proxy, "cloud", sam, secret, *what),
        "through the proxy, primary password": lambda: through(proxy, "cloud", sam, PRIMARY,
                                                               *what),
    }
    for label, run in runs.items():
        times = []
        for _ in range(5):
            started = time.perf_counter()
            done = run()
            times.append(time.perf_counter() - started)
            assert done.returncode == 0 and len(entries(done.stdout)) == BULK, done.stderr
        print(f"\n{label}: {statistics.median(times) * 1000:.0f} ms (median of 5)")
