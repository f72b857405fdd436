"""The portal end to end: a real headless Chromium (Selenium, Debian's
chromedriver) on the daemon's pages, in front of the real slapd and Dovecot,
with imaplib signing in through the proxy with what the pages made.

``PORTAL_SCREENSHOTS=docs/portal`` also writes the screenshots of
docs/portal.md (each page at desktop and phone widths)."""

from __future__ import annotations

import imaplib
import json
import os
import sqlite3
import ssl
import subprocess
import time
import urllib.parse

import pyotp
import pytest

from selenium.webdriver.support.select import Select

from tests.browser import Browser, screenshots_folder
from tests.conftest import audit_text, require_tool, wait_until
from tests.integration.conftest import PRIMARY
from tests.proxyd import ProxyDaemon, free_port, mail_backend

SIGN_IN_FAILED = "The user name, password or code is not right"


def portal_daemon(folder, slapd, dovecot, *, self_service: bool, extra: str = "",
                  throttle: str | None = None) -> ProxyDaemon:
    port = free_port()
    kwargs = {} if throttle is None else {"throttle": throttle}
    daemon = ProxyDaemon(folder, slapd, {"imap": mail_backend(folder, dovecot, "imap")}, **kwargs,
                         extra=(
        "policy:\n"
        f"  allow_user_app_passwords: {'true' if self_service else 'false'}\n"
        "portal:\n"
        f"  endpoint: tcp:{port}:interface=127.0.0.1\n"
        f"  certificate: {folder / 'pki' / 'server.pem'}\n"
        f"  private_key: {folder / 'pki' / 'server.key'}\n"
        f"  mail_relay: smtp://127.0.0.1:{dovecot.sink_port}\n"
        "  mail_from: security@example.test\n" + extra))
    daemon.ports["portal"] = port
    return daemon


@pytest.fixture(scope="module")
def chromium():
    require_tool("chromium")
    require_tool("chromedriver")


@pytest.fixture(scope="module")
def proxy(slapd, dovecot, tmp_path_factory, chromium):
    folder = tmp_path_factory.mktemp("proxy-portal")
    daemon = portal_daemon(folder, slapd, dovecot, self_service=True,
                           extra="  help_desk_app_passwords: true\n",  # see test_the_help_desk
                           throttle="  source_delay: 0.01\n  source_delay_max: 0.01\n"
                                    "  account_failures: 3\n  lockout: 10m")
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture
def browser(proxy, tmp_path):
    opened = []

    def make(shots: bool = False) -> Browser:
        b = Browser(f"https://127.0.0.1:{proxy.ports['portal']}", tmp_path / f"profile{len(opened)}",
                    screenshots_folder() if shots else None)
        opened.append(b)
        return b

    yield make
    for b in opened:
        b.close()


def imap(proxy):
    client = imaplib.IMAP4("127.0.0.1", proxy.ports["imap"], timeout=30)
    client.starttls(ssl.create_default_context(cafile=str(proxy.pki.ca_file)))
    return client


def imap_login(proxy, user, secret) -> bool:
    client = imap(proxy)
    try:
        client.login(user, secret)
    except imaplib.IMAP4.error:
        return False
    client.logout()
    return True


def sign_in(b: Browser, user: str, password: str = PRIMARY, code: str = "") -> None:
    b.open("/sign-in")
    b.fill("username", user)
    b.fill("password", password)
    if code:
        b.fill("code", code)
    b.press("Sign in")


def enrol(b: Browser, user: str, shots: bool = False) -> pyotp.TOTP:
    """First sign-in: set up the authenticator from the key the page shows."""
    sign_in(b, user)
    assert b.path == "/enrol", b.text()
    if shots:
        b.screenshot("enrol")
    totp = pyotp.TOTP(b.text("#totp-key").replace(" ", ""))
    b.fill("code", totp.now())
    b.press("Confirm")
    assert b.path == "/", b.text()
    assert "Your authenticator app is set up" in b.text()
    return totp


def next_code(totp: pyotp.TOTP) -> str:
    """A code of the next time step: the current one was used to enrol."""
    return totp.at(time.time() + 30)


def test_a_user_enrols_creates_an_app_password_uses_it_and_deletes_it(proxy, dovecot, slapd, unique,
                                                                      browser):
    uid = unique("portal")
    slapd.add_user(uid, PRIMARY)
    b = browser(shots=True)
    b.open("/")
    assert b.path == "/sign-in"
    b.screenshot("sign-in")
    sent_before = len(dovecot.sink_messages())
    enrol(b, uid, shots=True)
    # Enrolment registered the user for MFA, as Entra does: the primary
    # password no longer works over IMAP.
    shown = json.loads(proxy.cli("user", "show", uid, "--json").stdout)
    assert shown["mfa_state"] == "enforced"
    assert not imap_login(proxy, uid, PRIMARY)

    b.fill("name", "Outlook 2010")
    b.press("Create")
    assert "shown only this once" in b.text()
    secret = b.text("#secret")
    assert len(secret) == 19 and secret.count(" ") == 3  # abcd efgh ijkl mnop
    b.screenshot("created")
    status, headers, _ = b.request("GET", "/")
    assert headers["cache-control"] == "no-store"

    client = imap(proxy)
    assert client.login(uid, secret)[0] == "OK"
    assert client.select("INBOX")[0] == "OK"

    b.open("/")
    assert "Outlook 2010" in b.text() and "1 of at most 40" in b.text()
    b.screenshot("security-info")
    b.press("Delete")
    assert "Delete the app password “Outlook 2010”?" in b.text()
    b.screenshot("delete")
    b.press("Delete it")
    assert "Deleted the app password “Outlook 2010”." in b.text()
    # The open session ends at once, and the next login fails.
    deadline = time.monotonic() + 1.0
    ended = False
    while not ended and time.monotonic() < deadline:
        try:
            client.noop()
            time.sleep(0.05)
        except (imaplib.IMAP4.abort, OSError):
            ended = True
    assert ended, "the session of the deleted app password is still open"
    assert not imap_login(proxy, uid, secret)

    # The user was told by mail, at their directory address.
    # (The first one said an authenticator was set up.)
    messages = dovecot.wait_for_messages(2, since=sent_before)
    mine = [m for m in messages if f"{uid}@example.test" in m.rcpt_to
            and b"Subject: A new app password" in m.data]
    assert mine and "Outlook 2010" in mine[0].data.decode()

    # A code is never taken twice; the next one is.
    b.click(b.find("header button"))
    assert b.path == "/sign-in"
    audit = audit_text(proxy.folder / "audit.log")
    assert "second_factor_enrolled" in audit and secret.replace(" ", "") not in audit


def test_codes_are_single_use_and_wrong_codes_look_like_wrong_passwords(proxy, slapd, unique, browser):
    uid = unique("portal")
    slapd.add_user(uid, PRIMARY)
    b = browser()
    totp = enrol(b, uid)
    b.click(b.find("header button"))  # sign out
    used = totp.now()
    sign_in(b, uid, code=used)  # the code of enrolment's step, or of this one: used or not, see below
    if b.path == "/":
        b.click(b.find("header button"))
        sign_in(b, uid, code=used)  # the same code again
    assert b.path == "/sign-in" and SIGN_IN_FAILED in b.text()
    sign_in(b, uid, code=next_code(totp))
    assert b.path == "/", b.text()
    b.click(b.find("header button"))
    audit = [json.loads(line) for line in audit_text(proxy.folder / "audit.log").splitlines()]
    mine = [(e["outcome"], e["reason"]) for e in audit
            if e["event"] == "authentication" and e.get("user") == uid]
    # A right password with a replayed code is audited as the code's refusal
    # only: enrolment and two completed sign-ins are the accepted ones.
    assert mine.count(("refused", "wrong_code")) == 1
    assert mine.count(("accepted", "primary")) in (2, 3)
    # A wrong password, an unknown user and a wrong code get the same answer.
    answers = set()
    for user, password, code in ((uid, "wrong", totp.now()), (unique("nobody"), PRIMARY, "123456"),
                                 (uid, PRIMARY, "000000")):
        sign_in(b, user, password, code)
        answers.add(b.text("#error"))
    assert len(answers) == 1 and SIGN_IN_FAILED in answers.pop()


def test_wrong_codes_lock_the_account_even_with_the_right_password(proxy, slapd, unique, browser):
    uid = unique("portal")
    slapd.add_user(uid, PRIMARY)
    b = browser()
    totp = enrol(b, uid)
    b.click(b.find("header button"))
    for wrong in ("000001", "000002", "000003"):  # account_failures: 3
        sign_in(b, uid, code=wrong)
        assert SIGN_IN_FAILED in b.text("#error")
    sign_in(b, uid, code=next_code(totp))
    assert b.path == "/sign-in" and SIGN_IN_FAILED in b.text("#error")  # locked
    assert proxy.cli("user", "unlock", uid).returncode == 0
    proxy.wait_for(f"lockouts of {uid} lifted")  # the change feed reached the daemon
    sign_in(b, uid, code=next_code(totp))
    assert b.path == "/", b.text()


def test_a_second_enrolment_cannot_replace_the_first(proxy, slapd, unique, browser):
    uid = unique("portal")
    slapd.add_user(uid, PRIMARY)
    late = browser()
    sign_in(late, uid)
    assert late.path == "/enrol"
    late_key = late.text("#totp-key").replace(" ", "")
    first = browser()
    totp = enrol(first, uid)  # its sign-in ended the other enrolment
    late.fill("code", pyotp.TOTP(late_key).now())
    late.press("Confirm")
    assert late.path == "/sign-in"
    first.click(first.find("header button"))
    sign_in(first, uid, code=next_code(totp))
    assert first.path == "/", first.text()  # the first authenticator still works


def test_the_help_desk(proxy, slapd, unique, browser):
    helper, target, other = unique("desk"), unique("portal"), unique("portal")
    slapd.add_to_group(slapd.add_user(helper, PRIMARY), "admins")
    slapd.add_user(target, PRIMARY)
    slapd.add_user(other, PRIMARY)
    phone = proxy.create_app_password(target, "phone")
    proxy.create_app_password(target, "laptop")

    # An app password never signs in to the portal.
    b = browser()
    sign_in(b, target, phone)
    assert b.path == "/sign-in" and SIGN_IN_FAILED in b.text()

    # A non-admin gets 403 on every help-desk page.
    enrol(b, other)
    for path in ("/helpdesk", f"/helpdesk/users/{target}", f"/helpdesk/users/{target}/unlock"):
        status, _, body = b.request("GET", path)
        assert status == 403 and "This page is for the help desk." in body
    csrf = b.find("input[name=csrf]").get_attribute("value")
    status, _, _ = b.request("POST", f"/helpdesk/users/{target}/revoke-all", f"csrf={csrf}")
    assert status == 403

    # The target locks themselves out with wrong passwords over IMAP.
    for wrong in ("wrong-1", "wrong-2", "wrong-3"):
        assert not imap_login(proxy, target, wrong)
    assert not imap_login(proxy, target, phone)  # locked

    desk = browser(shots=True)
    enrol(desk, helper)
    desk.click(desk.find("nav a[href='/helpdesk']"))
    desk.screenshot("help-desk")
    desk.fill("user", target)
    desk.press("Find")
    assert desk.path == f"/helpdesk/users/{target}"
    page = desk.text()
    assert "locked for" in page and "phone" in page and "laptop" in page
    assert "wrong password" in page and "locked out" in page  # recent refusals, from the audit log
    desk.screenshot("help-desk-user")
    desk.press("Lift lockout")
    desk.press("Lift it")
    assert f"Lifted the lockout of {target}." in desk.text()
    assert imap_login(proxy, target, phone)
    desk.press("Delete all app passwords")
    desk.press("Delete them all")
    assert f"Deleted all 2 app passwords of {target}." in desk.text()
    assert not imap_login(proxy, target, phone)
    # The help desk makes one for the user, shown once to the help desk.
    desk.fill("name", "printer")
    desk.press("Create")
    assert f"New app password of {target}" in desk.text()
    assert imap_login(proxy, target, desk.text("#secret"))
    desk.press("Done")
    # Sets the MFA state; resets a lost authenticator (the user enrols again).
    Select(desk.find("#state")).select_by_value("enforced")
    desk.press("Set")
    desk.press("Set it to enforced")  # confirmed, as every action
    assert f"The MFA state of {target} is set to enforced." in desk.text()
    assert not imap_login(proxy, target, PRIMARY)  # enforced: app passwords only
    desk.open(f"/helpdesk/users/{other}")
    desk.press("Reset authenticator")
    desk.press("Reset it")
    assert f"{other} sets up an authenticator app at their next sign-in." in desk.text()
    b.open("/")
    assert b.path == "/sign-in"  # their page session ended
    sign_in(b, other)
    assert b.path == "/enrol"

    audit = [json.loads(line) for line in audit_text(proxy.folder / "audit.log").splitlines()]
    actions = {(e["event"], e.get("actor")) for e in audit if e.get("user") == target}
    assert ("lockout_lifted", f"portal:{helper}") in actions
    assert ("app_passwords_revoked", f"portal:{helper}") in actions
    assert ("app_password_created", f"portal:{helper}") in actions
    assert ("mfa_state_changed", f"portal:{helper}") in actions


def test_forms_are_protected_and_pages_are_strict(proxy, slapd, unique, browser):
    uid = unique("portal")
    slapd.add_user(uid, PRIMARY)
    b = browser()
    enrol(b, uid)
    status, headers, _ = b.request("GET", "/")
    assert status == 200
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"
    session = b.driver.get_cookie("__Host-portal-session")
    assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Strict"
    csrf = b.find("input[name=csrf]").get_attribute("value")
    # No CSRF token, a wrong one, or another origin: refused, nothing made.
    for body, headers in (("name=x", {}), ("name=x&csrf=nope", {}),
                          (f"name=x&csrf={csrf}", {"Origin": "https://evil.example"})):
        status, _, _ = b.request("POST", "/app-passwords", body, headers)
        assert status == 400
    assert json.loads(proxy.cli("app-password", "list", uid, "--json").stdout) == []
    # A body larger than any form is refused.
    status, _, _ = b.request("POST", "/app-passwords", "x=" + "a" * 100_000)
    assert status == 413
    # The form's own checks answer in words.
    b.fill("name", "scanner")
    b.find("details summary").click()
    b.fill("networks", "not-a-network")
    b.press("Create")
    assert "Not a network in CIDR form" in b.text("#error")
    b.fill("networks", "192.0.2.0/24")
    b.press("Create")
    assert "shown only this once" in b.text()
    listed = json.loads(proxy.cli("app-password", "list", uid, "--json").stdout)
    assert [a["name"] for a in listed] == ["scanner"]
    # Out of scope from 127.0.0.1.
    assert not imap_login(proxy, uid, b.text("#secret"))


def portal_curl(proxy, tmp_path, *args: str, path: str = "/sign-in"):
    """curl on the portal: (curl's exit code, the status, the headers, stderr)."""
    headers = tmp_path / "headers"
    done = subprocess.run([require_tool("curl"), "-sS", "--cacert", str(proxy.pki.ca_file),
                           "-D", str(headers), "-o", os.devnull, "-w", "%{http_code}", *args,
                           f"https://127.0.0.1:{proxy.ports['portal']}{path}"],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, headers.read_text() if headers.exists() else "", done.stderr


@pytest.mark.integration
def test_no_answer_names_the_server_software(proxy, tmp_path):
    code, status, headers, err = portal_curl(proxy, tmp_path)
    assert code == 0 and status == "200", err
    assert "server:" not in headers.lower() and "twisted" not in headers.lower(), headers


@pytest.mark.integration
@pytest.mark.parametrize("size, extra", [
    (500_000, []),  # read and dropped, then answered
    (4 << 20, []),  # curl asks for "100 Continue": answered at once, no body sent
    (4 << 20, ["-H", "Expect:"]),  # answered at once while the body comes
    (4 << 20, ["-H", "Transfer-Encoding: chunked"]),  # answered once 1 MiB has come
])
def test_a_body_too_large_is_answered_413_and_the_connection_closed_cleanly(proxy, tmp_path, size,
                                                                            extra):
    """docs/portal.md: 413, whatever the size; curl gets the whole answer and
    no reset (its exit code would say so)."""
    body = tmp_path / "body"
    body.write_bytes(b"x=" + b"a" * size)
    started = time.monotonic()
    code, status, headers, err = portal_curl(proxy, tmp_path, "--data-binary", f"@{body}", *extra,
                                             path="/app-passwords")
    assert (code, status) == (0, "413"), err
    assert "content-security-policy" in headers.lower() and "server:" not in headers.lower()
    assert time.monotonic() - started < 10


@pytest.mark.integration
def test_what_the_store_and_audit_hold_is_shown_escaped(proxy, slapd, unique, browser):
    """A last-used address with an escape sequence and a line break (an old
    row, or a balancer's header before zone ids were refused) is shown as
    escapes on the user's page."""
    uid = unique("portal")
    slapd.add_user(uid, PRIMARY)
    b = browser()
    enrol(b, uid)
    proxy.create_app_password(uid, "laptop")
    db = sqlite3.connect(proxy.folder / "store.sqlite3")
    with db:
        db.execute("UPDATE app_passwords SET last_used_at = 1794787200, last_used_address = ?,"
                   " last_used_protocol = 'imap' WHERE username = ?", ("fe80::1%\x1b[31mZONE\nX", uid))
    db.close()
    b.open("/")
    assert "from fe80::1%\\x1b[31mZONE\\x0aX over IMAP" in b.text()
    assert "\x1b" not in b.driver.page_source


def test_a_page_session_ends_when_the_password_changes(proxy, slapd, unique, browser):
    uid = unique("portal")
    dn = slapd.add_user(uid, PRIMARY)
    b = browser()
    enrol(b, uid)
    time.sleep(1.1)  # pwdChangedTime has whole seconds
    slapd.set_password(dn, "Another-Passw0rd")
    b.open("/")
    assert b.path == "/sign-in"


@pytest.fixture(scope="module")
def managed(slapd, dovecot, tmp_path_factory, chromium):
    """A daemon where self-service is off (the default)."""
    folder = tmp_path_factory.mktemp("proxy-portal-managed")
    daemon = portal_daemon(folder, slapd, dovecot, self_service=False)
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def test_with_self_service_off_the_page_is_read_only_and_app_passwords_keep_working(
        managed, slapd, unique, tmp_path):
    uid, blocked = unique("portal"), unique("portal")
    slapd.add_user(uid, PRIMARY)
    slapd.add_to_group(slapd.add_user(blocked, PRIMARY), "modern-auth-only")
    secret = managed.create_app_password(uid, "Outlook 2010")
    managed.create_app_password(uid, "old scanner", "--expires", "1s")
    assert wait_until(  # it lapses a second from now: polled, not slept for
        lambda: "(expired)" in managed.cli("app-password", "list", uid).stdout, 5)
    b = Browser(f"https://127.0.0.1:{managed.ports['portal']}", tmp_path / "p",
                screenshots_folder())
    try:
        enrol(b, uid)
        page = b.text()
        assert "managed by the help desk" in page and "Outlook 2010" in page
        assert "Stopped working on" in page and "it expired" in page  # listed, with why
        assert not b.all("main a.button") or all(e.text != "Delete" for e in b.all("main a.button"))
        assert not b.all("form[action='/app-passwords']")
        b.screenshot("security-info-managed")
        csrf = b.find("input[name=csrf]").get_attribute("value")
        status, _, _ = b.request("POST", "/app-passwords", f"name=x&csrf={urllib.parse.quote(csrf)}")
        assert status == 403
        assert imap_login(managed, uid, secret)
        listed = managed.cli("app-password", "list", uid)
        assert "stopped" in listed.stdout and "expired" in listed.stdout
        b.click(b.find("header button"))
        enrol(b, blocked)
        assert "App passwords do not work for you now" in b.text()
    finally:
        b.close()
