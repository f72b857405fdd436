"""The slapd fixture itself, checked with the real OpenLDAP clients: what
later tests rely on (binds over every transport, memberOf, ppolicy state,
restarts, the log) must hold before the proxy is put in front of it."""

import re
import socket
import subprocess
import time

import pytest

from tests.conftest import require_tool
from tests.slapd import parse_ldif

pytestmark = pytest.mark.integration


def run(slapd, tool, *args, env=None):
    return subprocess.run(
        [require_tool(tool), *args], capture_output=True, text=True, timeout=30,
        env=env or slapd.client_env(),
    )


def whoami(slapd, dn, password, url=None, *options):
    return run(slapd, "ldapwhoami", "-x", "-H", url or slapd.url, *options, "-D", dn, "-w", password)


def search_as_service(slapd, base, filter="(objectClass=*)", *attrs, scope="base"):
    """Entries found by the service account: a list of {attr: [values]}."""
    result = run(slapd, "ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-x", "-H", slapd.url,
                 "-D", slapd.service_dn, "-w", slapd.service_password,
                 "-b", base, "-s", scope, filter, *attrs)
    if result.returncode == 32:  # noSuchObject: the base does not exist
        return []
    assert result.returncode == 0, result.stderr
    return parse_ldif(result.stdout)


def read_as_service(slapd, dn, *attrs):
    entries = search_as_service(slapd, dn, "(objectClass=*)", *attrs)
    assert len(entries) == 1, entries
    return entries[0]


def test_user_binds_with_plain_ldap(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1")
    result = whoami(slapd, dn, "Secret-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dn:{dn}"


def test_user_binds_after_starttls(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1")
    # -ZZ: StartTLS is required to succeed, with the certificate verified
    # against the test CA (LDAPTLS_CACERT, LDAPTLS_REQCERT=demand).
    result = whoami(slapd, dn, "Secret-1", slapd.url, "-ZZ")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dn:{dn}"


def test_user_binds_over_ldaps(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1")
    assert slapd.ldaps_url == f"ldaps://127.0.0.1:{slapd.ldaps_port}"
    result = whoami(slapd, dn, "Secret-1", slapd.ldaps_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dn:{dn}"


def test_tls_is_verified_against_the_test_ca(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1")
    env = slapd.client_env(LDAPTLS_CACERT="/nonexistent/ca.pem")
    result = run(slapd, "ldapwhoami", "-x", "-H", slapd.ldaps_url, "-D", dn, "-w", "Secret-1",
                 env=env)
    assert result.returncode != 0


def test_wrong_password_fails_with_49(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1")
    result = whoami(slapd, dn, "wrong")
    assert result.returncode == 49, (result.stdout, result.stderr)
    # No lockout after failures (pwdMaxFailure 0): the right password works.
    for _ in range(3):
        whoami(slapd, dn, "wrong")
    assert whoami(slapd, dn, "Secret-1").returncode == 0


def test_unknown_user_fails_with_49(slapd, unique):
    result = whoami(slapd, slapd.user_dn(unique()), "whatever")
    assert result.returncode == 49


def test_user_gets_mail_and_hashed_password(slapd, unique):
    uid = unique()
    dn = slapd.add_user(uid, "Secret-1")
    other = slapd.add_user(unique(), "Secret-1", mail="someone@elsewhere.test")
    assert read_as_service(slapd, dn, "mail", "uid")["mail"] == [f"{uid}@example.test"]
    assert read_as_service(slapd, other, "mail")["mail"] == ["someone@elsewhere.test"]
    [entry] = slapd.search(dn, "(objectClass=*)", "userPassword")
    assert entry["userPassword"][0].startswith("{SSHA}")


def test_service_account_cannot_read_password_hashes(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1")
    assert "userPassword" not in read_as_service(slapd, dn, "userPassword", "uid")


def test_memberof_is_returned_to_the_service_account(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1", groups=("mfa", "admins"))
    entry = read_as_service(slapd, dn, "memberOf")
    assert sorted(entry["memberOf"]) == [
        "cn=admins,ou=groups,dc=example,dc=test",
        "cn=mfa,ou=groups,dc=example,dc=test",
    ]
    # Operational: not returned unless asked for by name.
    assert "memberOf" not in read_as_service(slapd, dn)


def test_memberof_follows_group_changes(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1")
    assert "memberOf" not in read_as_service(slapd, dn, "memberOf")
    slapd.add_to_group(dn, "modern-auth-only")
    assert read_as_service(slapd, dn, "memberOf")["memberOf"] == [
        "cn=modern-auth-only,ou=groups,dc=example,dc=test"
    ]
    slapd.remove_from_group(dn, "modern-auth-only")
    assert "memberOf" not in read_as_service(slapd, dn, "memberOf")


def test_unknown_group_is_refused(slapd, unique):
    with pytest.raises(ValueError):
        slapd.add_user(unique(), "Secret-1", groups=("wheel",))


def pwd_changed_time(slapd, dn):
    return read_as_service(slapd, dn, "pwdChangedTime").get("pwdChangedTime", [None])[0]


def test_set_password_sets_pwdchangedtime(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1")
    # ppolicy in 2.5 sets pwdChangedTime on Add only when the policy has
    # password aging (pwdMaxAge/pwdMinAge), which this one has not.
    assert pwd_changed_time(slapd, dn) is None
    slapd.set_password(dn, "Secret-2")
    first = pwd_changed_time(slapd, dn)
    assert re.fullmatch(r"\d{14}Z", first)
    assert whoami(slapd, dn, "Secret-2").returncode == 0
    assert whoami(slapd, dn, "Secret-1").returncode == 49

    time.sleep(1.1)  # pwdChangedTime has a resolution of one second
    slapd.set_password(dn, "Secret-3")
    second = pwd_changed_time(slapd, dn)
    assert second > first  # GeneralizedTime of equal length sorts as text
    assert whoami(slapd, dn, "Secret-3").returncode == 0


def test_ldapmodify_of_userpassword_sets_pwdchangedtime(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1")
    slapd.set_password(dn, "Secret-2")
    before = pwd_changed_time(slapd, dn)
    time.sleep(1.1)
    # A user changing their own password with a plain Modify (self write).
    result = subprocess.run(
        [require_tool("ldapmodify"), "-x", "-H", slapd.url, "-D", dn, "-w", "Secret-2"],
        input=f"dn: {dn}\nchangetype: modify\nreplace: userPassword\nuserPassword: Secret-3\n-\n",
        capture_output=True, text=True, timeout=30, env=slapd.client_env(),
    )
    assert result.returncode == 0, result.stderr
    assert pwd_changed_time(slapd, dn) > before
    assert whoami(slapd, dn, "Secret-3").returncode == 0
    # ppolicy_hash_cleartext: the cleartext sent was stored hashed.
    [entry] = slapd.search(dn, "(objectClass=*)", "userPassword")
    assert entry["userPassword"][0].startswith("{SSHA}")


def test_lock_and_unlock(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1")
    locked = "(pwdAccountLockedTime=*)"
    assert search_as_service(slapd, dn, locked) == []

    slapd.lock(dn)
    entries = search_as_service(slapd, dn, locked, "pwdAccountLockedTime")
    assert [e["pwdAccountLockedTime"] for e in entries] == [["000001010000Z"]]
    assert whoami(slapd, dn, "Secret-1").returncode == 49

    slapd.unlock(dn)
    assert search_as_service(slapd, dn, locked) == []
    assert whoami(slapd, dn, "Secret-1").returncode == 0
    slapd.unlock(dn)  # unlocking an unlocked account is no error


def test_user_added_locked(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1", locked=True)
    assert len(search_as_service(slapd, dn, "(pwdAccountLockedTime=*)")) == 1
    assert whoami(slapd, dn, "Secret-1").returncode == 49


def test_delete(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1", groups=("mfa",))
    slapd.delete(dn)
    assert search_as_service(slapd, dn) == []
    assert whoami(slapd, dn, "Secret-1").returncode == 49
    # memberof-refint: the group no longer lists the deleted user.
    group = read_as_service(slapd, slapd.group_dn("mfa"), "member")
    assert dn not in group["member"]


def test_users_read_people_but_not_passwords(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1")
    other = slapd.add_user(unique(), "Secret-1")
    result = run(slapd, "ldapsearch", "-LLL", "-x", "-H", slapd.url, "-D", dn, "-w", "Secret-1",
                 "-b", other, "-s", "base", "(objectClass=*)", "mail", "userPassword")
    assert result.returncode == 0, result.stderr
    assert "mail:" in result.stdout
    assert "userPassword" not in result.stdout


def test_stop_and_start_keep_ports_and_data(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1", groups=("admins",))
    url, ldaps_url = slapd.url, slapd.ldaps_url
    slapd.stop()
    try:
        with pytest.raises(OSError):
            socket.create_connection((slapd.host, slapd.port), timeout=1).close()
        assert whoami(slapd, dn, "Secret-1").returncode != 0
    finally:
        started = time.monotonic()
        slapd.start()
        elapsed = time.monotonic() - started
    assert elapsed < 2
    assert (slapd.url, slapd.ldaps_url) == (url, ldaps_url)
    assert whoami(slapd, dn, "Secret-1").returncode == 0
    assert whoami(slapd, dn, "Secret-1", slapd.ldaps_url).returncode == 0
    assert read_as_service(slapd, dn, "memberOf")["memberOf"] == [
        "cn=admins,ou=groups,dc=example,dc=test"
    ]


def test_log_shows_binds_and_their_results(slapd, unique):
    dn = slapd.add_user(unique(), "Secret-1")
    since = len(slapd.log_text())
    assert whoami(slapd, dn, "Secret-1").returncode == 0
    assert whoami(slapd, dn, "wrong").returncode == 49
    bind = re.escape(f'BIND dn="{dn}" method=128')
    # Each bind on its own connection, then its RESULT line (logged after the
    # client got the reply, hence waiting for it).
    ok = slapd.wait_for_log(
        rf"conn=(\d+) op=0 {bind}.*\n(?:.*\n)*?.*conn=\1 op=0 RESULT tag=97 err=0 ", since=since
    )
    failed = slapd.wait_for_log(
        rf"conn=(\d+) op=0 {bind}.*\n(?:.*\n)*?.*conn=\1 op=0 RESULT tag=97 err=49 ", since=since
    )
    assert ok.group(1) != failed.group(1)
    assert slapd.log_path.is_file()
    # How a test shows that a bind never reached slapd.
    assert f'BIND dn="{slapd.user_dn("never-bound")}"' not in slapd.log_text()
