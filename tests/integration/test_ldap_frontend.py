"""The LDAP front end, end to end: the real daemon in front of a real slapd,
driven by real clients (OpenLDAP's ldapwhoami, ldapsearch, ldapmodify, and
the Python ldap3 library), plus raw bytes for what no client sends."""

from __future__ import annotations

import json

import socket
import ssl
import subprocess
import time

import ldap3
import pytest
from ldaptor.protocols import pureber, pureldap

from tests.conftest import audit_text, require_tool
from tests.integration.conftest import PRIMARY
from tests.proxyd import ProxyDaemon


DECODER = pureldap.LDAPBERDecoderContext_TopLevel(
    inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
        fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
    )
)


@pytest.fixture(scope="module")
def proxy(slapd, tmp_path_factory):
    require_tool("ldapwhoami")
    daemon = ProxyDaemon(tmp_path_factory.mktemp("proxy-ldap"), slapd, {
        "cloud": {"protocol": "ldap", "realm": "cloud"},
        "ldaps": {"protocol": "ldap", "realm": "cloud", "tls": "implicit"},
        "onprem": {"protocol": "ldap", "realm": "on-premises"},
        "plain": {"protocol": "ldap", "realm": "cloud", "tls": "none",
                  "allow_plaintext_auth": True, "max_connections_per_source": 20},
        "anon": {"protocol": "ldap", "realm": "cloud", "allow_anonymous": True},
    })
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def ldap_tool(proxy, tool, listener, *args, starttls=True, scheme="ldap"):
    require_tool(tool)
    url = f"{scheme}://127.0.0.1:{proxy.ports[listener]}"
    command = [tool, "-x", "-H", url, *(["-ZZ"] if starttls else []), *args]
    return subprocess.run(command, capture_output=True, text=True, env=proxy.env(), timeout=60)


def whoami(proxy, listener, name, password, **kw):
    return ldap_tool(proxy, "ldapwhoami", listener, "-D", name, "-w", password, **kw)


def connection(proxy, listener, user, password, tls="starttls"):
    context = ldap3.Tls(ca_certs_file=str(proxy.pki.ca_file), validate=ssl.CERT_REQUIRED)
    server = ldap3.Server("127.0.0.1", port=proxy.ports[listener], use_ssl=tls == "implicit",
                          tls=context, get_info=ldap3.NONE, connect_timeout=10)
    conn = ldap3.Connection(server, user=user, password=password, receive_timeout=15,
                            raise_exceptions=False)
    conn.open()
    if tls == "starttls":
        assert conn.start_tls()
    return conn


# -- binds with real clients ---------------------------------------------------------


def test_ldapwhoami_with_an_app_password_over_starttls_and_ldaps(proxy, user):
    uid, dn, secret = user
    done = whoami(proxy, "cloud", uid, secret)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dn:{dn}"
    done = whoami(proxy, "ldaps", uid, secret, starttls=False, scheme="ldaps")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dn:{dn}"


def test_primary_and_app_passwords_per_realm(proxy, slapd, user, unique):
    uid, dn, secret = user
    assert whoami(proxy, "cloud", dn, PRIMARY).returncode == 0
    assert whoami(proxy, "onprem", uid, PRIMARY).returncode == 0
    done = whoami(proxy, "onprem", uid, secret)
    assert done.returncode == 49 and "Invalid credentials (49)" in done.stderr
    enforced = unique()
    slapd.add_user(enforced, PRIMARY, groups=["mfa"])
    app = proxy.create_app_password(enforced, "phone")
    assert whoami(proxy, "cloud", enforced, PRIMARY).returncode == 49
    assert whoami(proxy, "cloud", enforced, app).returncode == 0
    assert whoami(proxy, "onprem", enforced, PRIMARY).returncode == 0
    assert whoami(proxy, "cloud", uid, "wrong").returncode == 49
    assert whoami(proxy, "cloud", "nobody-at-all", "wrong").returncode == 49


def test_binds_in_the_clear_are_refused_unless_allowed(proxy, user):
    uid, _, secret = user
    done = whoami(proxy, "cloud", uid, secret, starttls=False)
    assert done.returncode == 13 and "Confidentiality required" in done.stderr
    assert whoami(proxy, "plain", uid, secret, starttls=False).returncode == 0


def test_an_empty_password_is_an_unauthenticated_bind_that_never_reaches_slapd(proxy, slapd, user):
    uid, dn, _ = user
    before = len(slapd.log_text())
    done = whoami(proxy, "cloud", dn, "")
    assert done.returncode == 53, done.stderr
    assert "unauthenticated binds are not allowed" in done.stderr
    time.sleep(0.2)
    assert f'BIND dn="{dn}"' not in slapd.log_text()[before:]


def test_anonymous_binds_are_refused_unless_allowed(proxy):
    conn = connection(proxy, "cloud", None, None)
    assert not conn.bind()
    assert conn.result["result"] == 48
    conn.unbind()
    conn = connection(proxy, "anon", None, None)
    assert conn.bind()
    assert conn.extend.standard.who_am_i() in (None, "")
    conn.unbind()


def test_ldap3_binds_and_who_am_i_names_the_user(proxy, user):
    uid, dn, secret = user
    for password in (secret, PRIMARY):
        conn = connection(proxy, "cloud", uid, password)
        assert conn.bind(), conn.result
        assert conn.extend.standard.who_am_i() == f"dn:{dn}"
        conn.unbind()
    conn = connection(proxy, "ldaps", f"{uid}@example.test", secret, tls="implicit")
    assert conn.bind(), conn.result
    conn.unbind()


def test_a_failed_bind_leaves_the_connection_anonymous(proxy, user):
    uid, dn, secret = user
    conn = connection(proxy, "cloud", uid, secret)
    assert conn.bind()
    conn.password = "wrong"
    assert not conn.rebind(user=uid, password="wrong")
    assert conn.result["result"] == 49
    assert conn.extend.standard.who_am_i() in (None, "")
    conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE)
    assert conn.result["result"] == 1  # operationsError: bind first
    assert conn.rebind(user=uid, password=secret)
    assert conn.extend.standard.who_am_i() == f"dn:{dn}"
    conn.unbind()


# -- after the bind ------------------------------------------------------------------


def entries(text):
    return sorted(block for block in text.strip().split("\n\n") if block.startswith("dn:"))


def test_searches_return_what_the_directory_returns(proxy, slapd, user):
    uid, dn, secret = user
    base = slapd.people_dn
    through = ldap_tool(proxy, "ldapsearch", "cloud", "-D", uid, "-w", secret, "-LLL",
                        "-o", "ldif-wrap=no", "-b", base, f"(uid={uid})", "uid", "mail", "cn")
    assert through.returncode == 0, through.stderr
    direct = subprocess.run(
        ["ldapsearch", "-x", "-H", slapd.url, "-ZZ", "-D", slapd.service_dn, "-w",
         slapd.service_password, "-LLL", "-o", "ldif-wrap=no", "-b", base, f"(uid={uid})",
         "uid", "mail", "cn"], capture_output=True, text=True, env=slapd.client_env(), timeout=60)
    assert entries(through.stdout) == entries(direct.stdout) != []
    as_user = ldap_tool(proxy, "ldapsearch", "onprem", "-D", dn, "-w", PRIMARY, "-LLL",
                        "-o", "ldif-wrap=no", "-b", dn, "-s", "base", "(objectClass=*)", "mail")
    assert as_user.returncode == 0 and f"mail: {uid}@example.test" in as_user.stdout


def test_paged_searches_pass_through(proxy, slapd, user, unique):
    uid, _, secret = user
    for _ in range(7):
        slapd.add_user(unique("page"), PRIMARY)
    conn = connection(proxy, "cloud", uid, secret)
    assert conn.bind()
    found = list(conn.extend.standard.paged_search(
        slapd.people_dn, "(uid=page*)", attributes=["uid"], paged_size=3, generator=True))
    assert len([e for e in found if e["type"] == "searchResEntry"]) >= 7
    conn.unbind()


def test_writes_after_an_app_password_bind_are_refused(proxy, slapd, user):
    uid, dn, secret = user
    change = f"dn: {dn}\nchangetype: modify\nreplace: description\ndescription: x\n"
    require_tool("ldapmodify")
    done = subprocess.run(
        ["ldapmodify", "-x", "-H", f"ldap://127.0.0.1:{proxy.ports['cloud']}", "-ZZ", "-D", uid,
         "-w", secret], input=change, capture_output=True, text=True, env=proxy.env(), timeout=60)
    assert done.returncode == 50, done.stderr
    assert "read-only" in done.stderr
    conn = connection(proxy, "cloud", uid, secret)
    assert conn.bind()
    conn.delete(dn)
    assert conn.result["result"] == 50
    conn.add(f"uid=new,{slapd.people_dn}", ["inetOrgPerson"], {"sn": "x", "cn": "x"})
    assert conn.result["result"] == 50
    conn.extend.standard.modify_password(dn, None, "New-One")
    assert conn.result["result"] == 50
    conn.unbind()
    assert slapd.search(dn)  # still there
    # Each refusal is the core's rule, and audited.
    refusals = [json.loads(line) for line in audit_text(proxy.folder / "audit.log").splitlines()
                if '"session_refusal"' in line]
    mine = [(e["user"], e["reason"], e["protocol"]) for e in refusals if e["user"] == uid]
    assert mine == [(uid, "write", "ldap")] * 4


def test_writes_after_a_primary_bind_go_to_the_directory(proxy, slapd, user):
    uid, dn, _ = user
    conn = connection(proxy, "onprem", uid, PRIMARY)
    assert conn.bind()
    conn.extend.standard.modify_password(dn, PRIMARY, "Changed-Passw0rd")
    assert conn.result["result"] == 0, conn.result
    conn.unbind()
    assert whoami(proxy, "onprem", uid, "Changed-Passw0rd").returncode == 0


# -- sessions end when their credentials do --------------------------------------------


def wait_closed(conn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn.search("dc=example,dc=test", "(objectClass=*)", search_scope=ldap3.BASE)
        except ldap3.core.exceptions.LDAPSessionTerminatedByServerError:
            return True  # the notice of disconnection arrived
        if conn.closed:
            return True
        time.sleep(0.3)
    return False


def test_deleting_the_app_password_ends_its_sessions(proxy, user):
    uid, dn, secret = user
    conn = connection(proxy, "cloud", uid, secret)
    other = connection(proxy, "cloud", uid, PRIMARY)
    assert conn.bind() and other.bind()
    assert proxy.cli("app-password", "delete", uid, "Outlook 2010").returncode == 0
    assert wait_closed(conn)
    other.search(dn, "(objectClass=*)", search_scope=ldap3.BASE)
    assert other.result["result"] == 0  # the primary session goes on
    other.unbind()


def test_an_account_locked_in_the_directory_loses_its_sessions(proxy, slapd, user):
    uid, dn, secret = user
    conn = connection(proxy, "cloud", uid, secret)
    assert conn.bind()
    slapd.lock(dn)
    try:
        assert wait_closed(conn)
    finally:
        slapd.unlock(dn)


# -- bad input -------------------------------------------------------------------------


def raw(proxy, listener="plain"):
    s = socket.create_connection(("127.0.0.1", proxy.ports[listener]), timeout=10)
    return s


def read_messages(s, timeout=10.0):
    s.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    messages = []
    while data:
        message, used = pureber.berDecodeObject(DECODER, data)
        if message is None:
            break
        messages.append(message)
        data = data[used:]
    return messages


def test_a_4_gib_length_header_is_refused_at_once(proxy, user):
    uid, _, secret = user
    bystander = connection(proxy, "cloud", uid, secret)
    assert bystander.bind()
    s = raw(proxy)
    s.sendall(b"\x30\x84\xff\xff\xff\xff")
    try:
        for _ in range(50):
            s.sendall(b"\x00" * 1000)
            time.sleep(0.01)
    except (BrokenPipeError, ConnectionResetError):
        pass
    messages = read_messages(s)
    s.close()
    assert messages and messages[0].id == 0
    assert messages[0].value.resultCode == 2  # protocolError
    assert bystander.extend.standard.who_am_i()  # other sessions unaffected
    bystander.unbind()
    assert "Traceback" not in proxy.log()


def test_a_message_over_the_pre_bind_limit_is_refused(proxy):
    s = raw(proxy)
    big = pureldap.LDAPMessage(pureldap.LDAPBindRequest(dn=b"x" * 300_000, auth=b"pw"), id=1)
    try:
        s.sendall(big.toWire())
    except (BrokenPipeError, ConnectionResetError):
        pass
    messages = read_messages(s)
    s.close()
    assert messages[-1].value.resultCode == 2


@pytest.mark.parametrize("garbage", [
    b"\x04\x05hello",                      # not a SEQUENCE
    b"\x30\x03\x02\x05\x01",               # an element past its container
    b"\x30\x80\x00\x00",                   # indefinite length
    b"\x30" + b"\x30\x7f" * 40,            # nested too deep (and truncated)
])
def test_malformed_ber_gets_protocol_error_and_a_clean_close(proxy, garbage):
    s = raw(proxy)
    s.sendall(garbage)
    messages = read_messages(s)
    s.close()
    assert len(messages) == 1 and messages[0].id == 0
    assert messages[0].value.resultCode == 2


def test_sasl_binds_are_not_supported(proxy):
    s = raw(proxy)
    s.sendall(pureldap.LDAPMessage(
        pureldap.LDAPBindRequest(dn=b"", auth=(b"PLAIN", b"\x00u\x00p"), sasl=True), id=1).toWire())
    s.sendall(pureldap.LDAPMessage(pureldap.LDAPUnbindRequest(), id=2).toWire())
    messages = read_messages(s)
    s.close()
    assert messages[0].value.resultCode == 7  # authMethodNotSupported


def test_a_bind_pipelined_after_starttls_is_never_executed(proxy, user):
    uid, _, secret = user
    audit_before = audit_text(proxy.folder / "audit.log").count('"authentication"')
    s = raw(proxy, "cloud")
    starttls = pureldap.LDAPMessage(pureldap.LDAPStartTLSRequest(), id=1).toWire()
    bind = pureldap.LDAPMessage(pureldap.LDAPBindRequest(dn=uid.encode(), auth=secret.encode()),
                                id=2).toWire()
    s.sendall(starttls + bind)
    s.settimeout(10)
    answer = s.recv(65536)
    message, used = pureber.berDecodeObject(DECODER, answer)
    assert message.id == 1 and message.value.resultCode == 0
    assert used == len(answer)  # nothing more: the bind got no answer in the clear
    context = ssl.create_default_context(cafile=str(proxy.pki.ca_file))
    tls = context.wrap_socket(s, server_hostname="localhost")
    tls.sendall(pureldap.LDAPMessage(pureldap.LDAPExtendedRequest(
        requestName=b"1.3.6.1.4.1.4203.1.11.3"), id=3).toWire())
    message, _ = pureber.berDecodeObject(DECODER, tls.recv(65536))
    assert message.id == 3 and message.value.response in (None, b"")  # still anonymous
    tls.close()
    time.sleep(0.2)
    assert audit_text(proxy.folder / "audit.log").count('"authentication"') == audit_before


def test_connections_per_source_are_limited(proxy):
    sockets = [raw(proxy) for _ in range(20)]
    extra = raw(proxy)
    messages = read_messages(extra, timeout=5)
    assert messages and messages[0].value.resultCode == 51
    for s in sockets:
        s.close()


def test_the_proxys_own_message_id_is_refused(proxy):
    s = raw(proxy)
    s.sendall(pureldap.LDAPMessage(pureldap.LDAPExtendedRequest(
        requestName=b"1.3.6.1.4.1.4203.1.11.3"), id=2**31 - 1).toWire())
    messages = read_messages(s)
    s.close()
    assert messages[-1].id == 0 and messages[-1].value.resultCode == 2


def test_one_connection_switching_identities_reaches_the_directory_as_each(proxy, user):
    """Binds on one client connection re-bind the session's directory
    connection: the directory sees the user after a primary bind (who may
    read their own userPassword, by slapd's ACL) and the service account
    after an app-password bind (who may not)."""
    uid, dn, secret = user

    def own_password_visible(conn):
        conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["userPassword"])
        assert conn.result["result"] == 0, conn.result
        return bool(conn.entries and conn.entries[0].entry_attributes_as_dict.get("userPassword"))

    conn = connection(proxy, "cloud", uid, secret)
    assert conn.bind()
    assert not own_password_visible(conn)
    assert conn.rebind(user=uid, password=PRIMARY)
    assert own_password_visible(conn)
    assert conn.rebind(user=uid, password=secret)
    assert not own_password_visible(conn)
    conn.modify(dn, {"description": [(ldap3.MODIFY_REPLACE, ["x"])]})
    assert conn.result["result"] == 50
    assert conn.rebind(user=uid, password=PRIMARY)
    assert own_password_visible(conn)
    assert conn.extend.standard.who_am_i() == f"dn:{dn}"
    conn.unbind()
