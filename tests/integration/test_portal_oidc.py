"""Signing in to the portal through a real identity provider (LemonLDAP::NG,
tests/idp.py), end to end in Chromium: the provider's sign-in page, back to
the portal, the fresh check before an app password is made (a new sign-in
at the provider: prompt=login, max_age, auth_time), the app password used
over IMAP through the proxy; and the directory still the authority."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.support.wait import WebDriverWait

from tests.browser import Browser, screenshots_folder
from tests.conftest import audit_text, wait_until
from tests.integration.conftest import PRIMARY
from tests.integration.test_portal import enrol, imap, imap_login, portal_daemon

SECRET = "portal-client-secret"
FRESH = 30  # portal.fresh_check, seconds: its least


@pytest.fixture(scope="module")
def client_id(unique_module):
    return unique_module


@pytest.fixture(scope="module")
def unique_module(_unique_counter):
    return f"portal{next(_unique_counter):04d}"


@pytest.fixture(scope="module")
def proxy(slapd, dovecot, idp, tmp_path_factory, client_id):
    from tests.conftest import require_tool

    require_tool("chromium")
    require_tool("chromedriver")
    folder = tmp_path_factory.mktemp("proxy-portal-oidc")
    (folder / "oidc-secret").write_text(SECRET + "\n")
    daemon = portal_daemon(folder, slapd, dovecot, self_service=True, extra=(
        f"  fresh_check: {FRESH}s\n"
        "  oidc:\n"
        f"    issuer: {idp.issuer}\n"
        f"    client_id: {client_id}\n"
        f"    client_secret_file: {folder / 'oidc-secret'}\n"
        f"    ca_file: {idp.ca_file}\n"
        "    mfa_amr: [otp]\n"
        "    provider_name: Example Login\n"))
    port = daemon.ports["portal"]
    idp.add_client(client_id, SECRET, redirect_uris=[f"https://127.0.0.1:{port}/oidc/callback"],
                   amr=["pwd", "otp"])
    idp.wait_for_config(lambda: idp.knows(client_id, SECRET))
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture
def browser(proxy, tmp_path):
    opened = []

    def make() -> Browser:
        b = Browser(f"https://127.0.0.1:{proxy.ports['portal']}", tmp_path / f"profile{len(opened)}",
                    screenshots_folder())
        opened.append(b)
        return b

    yield make
    for b in opened:
        b.close()


def at_provider(b: Browser, idp) -> bool:
    return b.driver.current_url.startswith(idp.issuer)


def provider_sign_in(b: Browser, idp, user: str, password: str = PRIMARY) -> None:
    """On the provider's sign-in page: the directory password."""
    assert at_provider(b, idp), b.driver.current_url
    WebDriverWait(b.driver, 30).until(lambda d: b.all("#passwordfield"),
                                      message="no sign-in form at the provider")
    if b.find("#userfield").get_attribute("value") != user:
        b.fill("userfield", user)
    b.fill("passwordfield", password)
    b.click(b.find("form button[type=submit]"))


def back_at_portal(b: Browser, path: str = "/") -> None:
    """The callback's page sends the browser on (meta refresh) to ``path``."""
    target = b.base + path
    try:
        WebDriverWait(b.driver, 30).until(
            lambda d: d.current_url.split("?")[0] == target
            and d.execute_script("return document.readyState") == "complete")
    except TimeoutException:
        raise AssertionError(f"not back at {target} but at {b.driver.current_url}:\n"
                             f"{b.text('body')}") from None


def audit(proxy) -> list[dict]:
    return [json.loads(line) for line in audit_text(proxy.folder / "audit.log").splitlines()]


def test_sign_in_at_the_provider_the_fresh_check_and_an_app_password_over_imap(
        proxy, idp, slapd, unique, browser):
    uid = unique("oidc")
    slapd.add_user(uid, PRIMARY)
    b = browser()
    # Signed in at the provider long before (an open single sign-on
    # session): that alone must not be enough to mint an app password.
    b.driver.get(idp.issuer + "/")
    provider_sign_in(b, idp, uid)
    time.sleep(FRESH + 2)

    b.open("/")
    assert b.path == "/sign-in"
    b.screenshot("sign-in-oidc")
    b.press("Sign in with Example Login")
    # The provider's session is still open: no password asked, straight back.
    back_at_portal(b)
    assert uid in b.driver.page_source, proxy.log()[-6000:]
    b.fill("name", "Thunderbird")
    b.press("Create")
    # The sign-in at the provider is older than portal.fresh_check: sent
    # to sign in there again (prompt=login), whatever the page session's age.
    assert b.path == "/confirm-it-is-you", b.text()
    assert json.loads(proxy.cli("app-password", "list", uid, "--json").stdout) == []
    b.screenshot("confirm-it-is-you-oidc")
    b.press("Sign in again with Example Login")
    # Its single sign-on session is open, yet it asks for the password
    # again (prompt=login); the ID token's auth_time is then checked.
    provider_sign_in(b, idp, uid)
    back_at_portal(b)
    assert "Confirmed" in b.text()
    b.fill("name", "Thunderbird")
    b.press("Create")
    assert "shown only this once" in b.text(), b.text()
    secret = b.text("#secret")

    client = imap(proxy)
    assert client.login(uid, secret)[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    client.logout()
    assert not imap_login(proxy, uid, PRIMARY + "x")

    events = [e for e in audit(proxy) if e.get("user") == uid]
    signed = [e for e in events if e["event"] == "portal_sign_in"]
    assert signed[-1]["outcome"] == "accepted" and signed[-1]["method"] == "oidc"
    assert signed[-1]["amr"] == ["pwd", "otp"] and signed[-1]["acr"] == idp.acr
    checks = [(e["outcome"], e["method"]) for e in events if e["event"] == "portal_fresh_check"]
    assert checks == [("accepted", "oidc")]
    assert any(e["event"] == "app_password_created" for e in events)
    assert secret.replace(" ", "") not in audit_text(proxy.folder / "audit.log")


def test_a_disabled_directory_account_is_refused_after_a_good_provider_sign_in(
        proxy, idp, slapd, unique, browser):
    uid = unique("oidc")
    dn = slapd.add_user(uid, PRIMARY)
    b = browser()
    b.driver.get(idp.issuer + "/")
    provider_sign_in(b, idp, uid)  # the provider signs them in ...
    slapd.lock(dn)  # ... then the directory disables the account
    b.open("/sign-in")
    b.press("Sign in with Example Login")
    back_at_portal(b, "/oidc/callback")
    assert "cannot use this page" in b.text()
    status, _, _ = b.request("GET", "/")
    assert status == 303  # no page session

    def refused():
        return [(e["outcome"], e["reason"]) for e in audit(proxy)
                if e.get("user") == uid and e["event"] == "portal_sign_in"]

    assert wait_until(refused, 10), "no refusal audited"  # written off the reactor
    assert refused() == [("refused", "account_inactive")]


def test_no_password_is_taken_by_the_portal_itself(proxy, browser):
    b = browser()
    b.open("/sign-in")
    assert not b.all("#password") and "Sign in with Example Login" in b.text()


@pytest.fixture(scope="module")
def totp_proxy(slapd, dovecot, tmp_path_factory):
    """A portal without a provider: password and TOTP, fresh_check 30 s."""
    folder = tmp_path_factory.mktemp("proxy-portal-fresh")
    daemon = portal_daemon(folder, slapd, dovecot, self_service=True,
                           extra=f"  fresh_check: {FRESH}s\n")
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def test_a_stale_session_is_asked_for_a_new_code_before_minting_or_a_help_desk_action(
        totp_proxy, slapd, unique, tmp_path):
    proxy = totp_proxy
    uid, helper, target = unique("fresh"), unique("desk"), unique("fresh")
    slapd.add_user(uid, PRIMARY)
    slapd.add_to_group(slapd.add_user(helper, PRIMARY), "admins")
    slapd.add_user(target, PRIMARY)
    proxy.create_app_password(target, "printer")
    base = f"https://127.0.0.1:{proxy.ports['portal']}"
    user = Browser(base, tmp_path / "user", screenshots_folder())
    desk = Browser(base, tmp_path / "desk")
    try:
        user_totp, desk_totp = enrol(user, uid), enrol(desk, helper)
        desk.open(f"/helpdesk/users/{target}")
        time.sleep(FRESH + 2)  # both page sessions live on; their codes grow old

        user.fill("name", "Outlook")
        user.press("Create")
        assert user.path == "/confirm-it-is-you", user.text()
        assert json.loads(proxy.cli("app-password", "list", uid, "--json").stdout) == []
        user.screenshot("confirm-it-is-you")
        user.fill("code", "000000")
        user.press("Confirm")
        assert "That code is not right" in user.text("#error")
        user.fill("code", user_totp.now())
        user.press("Confirm")
        assert user.path == "/" and "Confirmed" in user.text()
        user.fill("name", "Outlook")
        user.press("Create")
        assert "shown only this once" in user.text()

        desk.press("Delete all app passwords")
        desk.press("Delete them all")
        assert desk.path == "/confirm-it-is-you", desk.text()
        assert len(json.loads(proxy.cli("app-password", "list", target, "--json").stdout)) == 1
        desk.fill("code", desk_totp.now())
        desk.press("Confirm")
        assert desk.path.startswith(f"/helpdesk/users/{target}"), desk.path  # back to the form
        desk.press("Delete them all")
        assert f"Deleted all 1 app passwords of {target}." in desk.text()
    finally:
        user.close()
        desk.close()
    checks = [(e["user"], e["outcome"]) for e in audit(proxy) if e["event"] == "portal_fresh_check"]
    assert checks == [(uid, "refused"), (uid, "accepted"), (helper, "accepted")]


def test_an_unreadable_client_secret_refuses_to_start_naming_the_key(slapd, dovecot, idp,
                                                                     tmp_path):
    daemon = portal_daemon(tmp_path, slapd, dovecot, self_service=True, extra=(
        "  oidc:\n"
        f"    issuer: {idp.issuer}\n"
        "    client_id: portal\n"
        f"    client_secret_file: {tmp_path / 'no-such-secret'}\n"))
    done = subprocess.run([sys.executable, "-m", "proxy", "--config", str(daemon.config), "serve"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 78, done.stdout + done.stderr
    assert "portal.oidc.client_secret_file: cannot read" in done.stdout + done.stderr


def test_a_fresh_check_passed_by_someone_else_at_the_provider_counts_for_nothing(
        proxy, idp, slapd, unique, browser):
    from tests.idp import FORCE_AUTHN_INTERVAL

    uid, other = unique("oidc"), unique("oidc")
    slapd.add_user(uid, PRIMARY)
    slapd.add_user(other, PRIMARY)
    b = browser()
    b.open("/sign-in")
    b.press("Sign in with Example Login")
    provider_sign_in(b, idp, uid)
    back_at_portal(b)
    time.sleep(FORCE_AUTHN_INTERVAL + 1)  # so that prompt=login asks again
    b.open("/confirm-it-is-you/oidc?next=/")
    provider_sign_in(b, idp, other)  # another person at the provider's form
    WebDriverWait(b.driver, 30).until(lambda d: d.current_url.startswith(b.base))

    def checks():
        return [(e["user"], e["outcome"], e.get("reason")) for e in audit(proxy)
                if e["event"] == "portal_fresh_check" and e.get("user") in (uid, other)]

    assert wait_until(lambda: checks(), 10), "no fresh check audited"  # written off the reactor
    assert checks() == [(uid, "refused", "another_user")]
