"""The portal as a new user and a help-desk agent walk through it (issue #25,
"What a walk through the portal found"): a real headless Chromium on the
daemon's pages, in front of the real slapd and Dovecot (its SMTP sink takes
the portal's mail). Each test names the finding it holds fixed.

``PORTAL_SCREENSHOTS=docs/portal`` also writes the screenshots of
docs/portal.md these pages are in."""

from __future__ import annotations

import json
import time

import pytest
from selenium.webdriver.support.select import Select

from tests.browser import PHONE, Browser, screenshots_folder
from tests.conftest import audit_text, require_tool, wait_until
from tests.integration.conftest import PRIMARY
from tests.integration.test_portal import enrol, imap_login, portal_daemon, sign_in

INDIA = "Asia/Kolkata"  # UTC+05:30 all year: no summer time to reckon with


@pytest.fixture(scope="module")
def chromium():
    require_tool("chromium")
    require_tool("chromedriver")


@pytest.fixture(scope="module")
def walk(slapd, dovecot, tmp_path_factory, chromium):
    """Self-service on, and the help desk allowed to make app passwords."""
    folder = tmp_path_factory.mktemp("proxy-portal-walk")
    daemon = portal_daemon(folder, slapd, dovecot, self_service=True,
                           extra="  help_desk_app_passwords: true\n",
                           throttle="  source_delay: 0.01\n  source_delay_max: 0.01\n"
                                    "  account_failures: 3\n  lockout: 10m")
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture(scope="module")
def default(slapd, dovecot, tmp_path_factory, chromium):
    """The portal's defaults: no self-service, the help desk makes no app passwords."""
    folder = tmp_path_factory.mktemp("proxy-portal-default")
    daemon = portal_daemon(folder, slapd, dovecot, self_service=False)
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture
def browser(tmp_path):
    opened = []

    def make(daemon, zone: str | None = None, shots: bool = False) -> Browser:
        b = Browser(f"https://127.0.0.1:{daemon.ports['portal']}", tmp_path / f"profile{len(opened)}",
                    screenshots_folder() if shots else None)
        opened.append(b)
        if zone:
            b.driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": zone})
        return b

    yield make
    for b in opened:
        b.close()


def audit(daemon) -> list[dict]:
    return [json.loads(line) for line in audit_text(daemon.folder / "audit.log").splitlines()]


def mails_to(dovecot, user: str, subject: str, since: int) -> list[str]:
    """The messages to ``user`` whose subject starts so, sent since ``since``, once there is one."""
    found: list[str] = []

    def arrived() -> bool:
        found[:] = [m.data.decode() for m in dovecot.sink_messages()[since:]
                    if f"{user}@example.test" in m.rcpt_to and f"Subject: {subject}" in m.data.decode()]
        return bool(found)

    wait_until(arrived, 15)
    return found


def help_desk_agent(b: Browser, slapd, unique) -> str:
    agent = unique("desk")
    slapd.add_to_group(slapd.add_user(agent, PRIMARY), "admins")
    enrol(b, agent)
    return agent


def active_text(b: Browser) -> str:
    return b.driver.execute_script("return document.activeElement.textContent.trim()")


# -- the help desk and a user's app passwords ------------------------------------------------


def test_by_default_the_help_desk_cannot_make_an_app_password(default, slapd, unique, browser):
    """Finding: the help desk could make any user's app password and see it.
    Off by default; the 403 page keeps the menu and sign-out."""
    user = unique("walk")
    slapd.add_user(user, PRIMARY)
    desk = browser(default)
    help_desk_agent(desk, slapd, unique)
    desk.open(f"/helpdesk/users/{user}")
    assert desk.path == f"/helpdesk/users/{user}"
    assert not desk.all(f"form[action='/helpdesk/users/{user}/app-passwords']")
    csrf = desk.find("input[name=csrf]").get_attribute("value")
    status, _, body = desk.request("POST", f"/helpdesk/users/{user}/app-passwords",
                                   f"csrf={csrf}&name=printer")
    assert status == 403 and "does not create app passwords here" in body
    assert "Sign out" in body and 'href="/helpdesk"' in body
    assert json.loads(default.cli("app-password", "list", user, "--json").stdout) == []


def test_an_app_password_the_help_desk_makes_is_told_to_the_user_and_audited(
        walk, dovecot, slapd, unique, browser):
    """Finding: where allowed, the user is told every time (mail, and their
    page while it exists) and the showing is audited; the page that shows
    it is reached by a redirect, so a reload shows it no more."""
    user = unique("walk")
    slapd.add_user(user, PRIMARY)
    desk = browser(walk)
    agent = help_desk_agent(desk, slapd, unique)
    sent = len(dovecot.sink_messages())
    desk.open(f"/helpdesk/users/{user}")
    assert "is told every time" in desk.text()
    desk.fill("name", "printer")
    desk.press("Create")
    assert desk.path == "/app-passwords/new"
    assert f"New app password of {user}" in desk.text() and "has been told" in desk.text()
    secret = desk.text("#secret")
    assert imap_login(walk, user, secret)
    desk.driver.refresh()
    assert secret not in desk.driver.page_source and "shown once only" in desk.text()

    mail = mails_to(dovecot, user, "The help desk created an app password", sent)[0]
    assert agent in mail and "printer" in mail and "read and send your mail" in mail
    shown = [e for e in audit(walk) if e["event"] == "app_password_shown_to_help_desk"
             and e.get("user") == user]
    assert len(shown) == 1 and shown[0]["actor"] == f"portal:{agent}"
    assert shown[0]["app_password_name"] == "printer" and secret.replace(" ", "") not in json.dumps(shown)

    b = browser(walk)
    enrol(b, user)
    notice = b.text(".by-help-desk")
    assert f"The help desk ({agent}) created the app password “printer” for you" in notice
    assert f"by the help desk ({agent})" in b.text(".app-password")


def test_a_reload_of_the_new_app_password_page_posts_nothing(walk, slapd, unique, browser):
    """Finding: no redirect after POST; a reload said "already exists" and
    counted against the creation limit."""
    user = unique("walk")
    slapd.add_user(user, PRIMARY)
    b = browser(walk)
    enrol(b, user)
    b.fill("name", "tablet")
    b.press("Create")
    assert b.path == "/app-passwords/new" and "shown only this once" in b.text()
    b.driver.refresh()
    assert b.path == "/" and "shown once only" in b.text()
    assert "There is an app password named" not in b.text()
    listed = json.loads(walk.cli("app-password", "list", user, "--json").stdout)
    assert [a["name"] for a in listed] == ["tablet"]
    csrf = b.find("input[name=csrf]").get_attribute("value")
    status, headers, _ = b.request("POST", "/app-passwords", f"csrf={csrf}&name=phone")
    assert status == 303 and headers["location"] == "/app-passwords/new"


def test_messages_quote_names_for_people(walk, slapd, unique, browser):
    """Finding: `'Bob\\'s "work" phone'` and `'<b>nobody</b>'`."""
    user = unique("walk")
    slapd.add_user(user, PRIMARY)
    b = browser(walk)
    enrol(b, user)
    name = 'Bob\'s "work" phone'
    walk.create_app_password(user, name)
    b.open("/")
    b.fill("name", name)
    b.press("Create")
    assert b.text("#error").startswith(f"There is an app password named “{name}” already.")
    desk = browser(walk)
    help_desk_agent(desk, slapd, unique)
    desk.open("/helpdesk")
    desk.fill("user", "<b>nobody</b>")
    desk.press("Find")
    assert "No user name contains “<b>nobody</b>”." in desk.text("#error")


def test_an_expiry_date_is_listed_as_that_day(walk, slapd, unique, browser):
    """Finding: 2027-03-07 was listed as "2027-03-08 00:00 UTC". It works
    to the end of that day where the browser is, and is listed so."""
    for zone, local, utc in (("UTC", "2027-03-07 23:59 (UTC+00:00)", "2027-03-07 23:59 UTC"),
                             (INDIA, "2027-03-07 23:59 (UTC+05:30)", "2027-03-07 18:29 UTC")):
        user = unique("walk")
        slapd.add_user(user, PRIMARY)
        b = browser(walk, zone)
        enrol(b, user)
        b.fill("name", "scanner")
        b.driver.execute_script("document.getElementById('expires').value = '2027-03-07'")
        b.press("Create")
        b.press("Done")
        expiry = b.find(".app-password dd.expires time")
        assert (expiry.text, expiry.get_attribute("title")) == (local, utc)


# -- the help desk's pages -------------------------------------------------------------------


def test_setting_the_mfa_state_is_confirmed_and_the_state_in_effect_shown(
        walk, slapd, unique, browser):
    """Finding: set without confirmation; then "now disabled" beside
    "disabled (enforced by group)" hid the state in effect."""
    user = unique("walk")
    slapd.add_user(user, PRIMARY, groups=("mfa",))
    desk = browser(walk, shots=True)
    help_desk_agent(desk, slapd, unique)
    desk.open(f"/helpdesk/users/{user}")
    assert desk.text("#mfa-state").startswith("enforced (by a directory group; set here: disabled")
    Select(desk.find("#state")).select_by_value("enabled")
    desk.press("Set")
    assert f"Set the MFA state of {user} to enabled?" in desk.text()
    assert "In effect it will be enforced (by a directory group; set here: enabled" in desk.text()
    assert active_text(desk) == "Cancel"  # Enter goes back, it does not act
    assert json.loads(walk.cli("user", "show", user, "--json").stdout)["mfa_state"] == "disabled"
    desk.screenshot("help-desk-mfa")
    desk.press("Set it to enabled")
    assert f"The MFA state of {user} is set to enabled. In effect it stays enforced" in desk.text()
    assert "now enabled" not in desk.text()
    assert desk.text("#mfa-state").startswith("enforced (by a directory group; set here: enabled")
    assert json.loads(walk.cli("user", "show", user, "--json").stdout)["mfa_state"] == "enabled"
    assert not imap_login(walk, user, PRIMARY)  # the group's word holds


def test_refused_sign_ins_say_what_is_known_and_fit_a_phone(walk, slapd, unique, browser):
    """Finding: every wrong secret of an MFA user was "primary password
    where an app password is needed"; rows did not say which app password
    was tried; on a phone the "Why" column was off the screen. The user
    sees their own refusals too."""
    user = unique("walk")
    slapd.add_user(user, PRIMARY)
    b = browser(walk, shots=True)
    enrol(b, user)  # registered: enforced
    assert not imap_login(walk, user, "abcdabcdabcdabcd")  # no app password of theirs
    out_of_scope = walk.create_app_password(user, "office scanner", "--network", "192.0.2.0/24")
    assert not imap_login(walk, user, out_of_scope)
    desk = browser(walk)
    help_desk_agent(desk, slapd, unique)
    desk.open(f"/helpdesk/users/{user}")
    rows = [r.text for r in desk.all("table.refusals tbody tr")]
    assert len(rows) == 2, rows
    assert "“office scanner”" in rows[0] and "app password not allowed there" in rows[0]
    assert "not one of their app passwords" in rows[1] and "none recognised" in rows[1]
    assert "primary password where" not in desk.text()
    desk.driver.set_window_size(*PHONE)
    width = desk.driver.execute_script("return document.documentElement.clientWidth")
    for cell in desk.all("table.refusals td.why-refused"):
        box = desk.driver.execute_script("return arguments[0].getBoundingClientRect()", cell)
        assert 0 <= box["left"] and box["right"] <= width, (box, width)

    b.open("/")
    b.click(b.find("a[href='/refused-sign-ins']"))
    b.screenshot("refused-sign-ins")
    own = b.text("table.refusals")
    assert "“office scanner”" in own and "app password not allowed there" in own


def test_error_pages_keep_the_menu_of_a_signed_in_user(walk, slapd, unique, browser):
    """Finding: the 400 and 403 pages dropped the menu and the sign-out."""
    user = unique("walk")
    slapd.add_user(user, PRIMARY)
    b = browser(walk)
    enrol(b, user)
    b.open("/helpdesk")
    assert "This page is for the help desk." in b.text()
    assert b.find("header nav a[href='/']") and "Sign out" in b.text("header")
    b.open("/")
    b.driver.execute_script("document.querySelector('form[action=\"/app-passwords\"] "
                            "input[name=csrf]').value = 'out-of-date'")
    b.fill("name", "laptop")
    b.press("Create")
    assert "The form was out of date" in b.text()
    assert b.find("header nav a[href='/']") and "Sign out" in b.text("header")
    b.press("Sign out")
    assert b.path == "/sign-in"


def test_setting_up_an_authenticator_is_mailed_and_confirmations_focus_cancel(
        walk, dovecot, slapd, unique, browser):
    """Finding: setting up a second factor was not notified; confirmation
    pages put the focus on the destructive button (Enter deleted)."""
    user = unique("walk")
    slapd.add_user(user, PRIMARY)
    sent = len(dovecot.sink_messages())
    b = browser(walk)
    enrol(b, user)
    mail = mails_to(dovecot, user, "An authenticator app was set up", sent)[0]
    assert user in mail and "127.0.0.1" in mail
    walk.create_app_password(user, "laptop")
    b.open("/")
    b.press("Delete")
    assert "Delete the app password “laptop”?" in b.text()
    assert active_text(b) == "Cancel"
    b.driver.switch_to.active_element.send_keys("\n")
    wait_until(lambda: b.path == "/", 10)
    assert [a["name"] for a in json.loads(walk.cli("app-password", "list", user, "--json").stdout)] \
        == ["laptop"]


def test_the_help_desk_finds_part_of_a_name_and_lists_who_is_locked_out(
        walk, slapd, unique, browser):
    """Finding: exact names only; no list of locked-out users; "Lift
    lockout" offered when nothing is locked."""
    stem = unique("fam")
    first, second, calm = stem + "ily", stem + "ous", unique("walk")
    for uid in (first, second, calm):
        slapd.add_user(uid, PRIMARY)
    desk = browser(walk, shots=True)
    help_desk_agent(desk, slapd, unique)
    desk.open("/helpdesk")
    desk.fill("user", stem)
    desk.press("Find")
    assert [a.text for a in desk.all("ul.found a")] == sorted([first, second])
    desk.open("/helpdesk")
    desk.fill("user", first[-6:])  # the end of one name: straight to it
    desk.press("Find")
    assert desk.path == f"/helpdesk/users/{first}"

    for wrong in ("wrong-1", "wrong-2", "wrong-3"):  # account_failures: 3
        assert not imap_login(walk, first, wrong)
    desk.open("/helpdesk")
    assert first in [a.text for a in desk.all("#locked a")]
    desk.fill("user", stem)
    desk.press("Find")
    desk.screenshot("help-desk-search")
    desk.open(f"/helpdesk/users/{calm}")
    assert "Lift lockout" not in desk.text()
    desk.open(f"/helpdesk/users/{first}")
    desk.press("Lift lockout")
    desk.press("Lift it")
    desk.open("/helpdesk")
    assert first not in [a.text for a in desk.all("#locked a")]


# -- what a user sees of themselves ---------------------------------------------------------


def test_users_see_their_sessions_and_times_in_their_own_zone(walk, slapd, unique, browser):
    """Finding: users could not see their own portal sessions; times were
    in UTC only (it stays in each time's tooltip)."""
    user = unique("walk")
    slapd.add_user(user, PRIMARY)
    first = browser(walk, INDIA, shots=True)
    totp = enrol(first, user)
    second = browser(walk)
    sign_in(second, user, code=totp.at(time.time() + 30))
    assert second.path == "/", second.text()
    first.open("/")
    sessions = [li.text for li in first.all("ul.sessions li")]
    assert len(sessions) == 2 and sessions[0].startswith("This browser, from 127.0.0.1")
    assert sessions[1].startswith("Another browser, from 127.0.0.1")
    times = first.all("main time")
    assert times and all(t.text.endswith("(UTC+05:30)") and t.get_attribute("title").endswith(" UTC")
                         for t in times)
    first.screenshot("security-info-sessions")


def test_a_user_signs_out_another_browser_of_theirs(walk, slapd, unique, browser):
    """Finding: users saw their other portal sessions but could not end one
    ("sign out that other browser"). Confirmed, the focus on Cancel; ended
    at once; audited."""
    user = unique("walk")
    slapd.add_user(user, PRIMARY)
    first = browser(walk)
    totp = enrol(first, user)
    second = browser(walk)
    sign_in(second, user, code=totp.at(time.time() + 30))
    assert second.path == "/", second.text()
    assert "Sign that browser out" in second.text()  # for the first browser
    first.open("/")
    assert len(first.all("ul.sessions li")) == 2
    first.press("Sign that browser out")
    assert "Sign out that browser?" in first.text()
    assert active_text(first) == "Cancel"
    first.press("Sign it out")
    wait_until(lambda: first.path == "/", 10)
    assert "That browser is signed out." in first.text()
    sessions = [li.text for li in first.all("ul.sessions li")]
    assert len(sessions) == 1 and sessions[0].startswith("This browser")
    assert "Sign that browser out" not in first.text()  # never this one
    second.open("/")
    assert second.path == "/sign-in"
    ended = [e for e in audit(walk) if e["event"] == "portal_session_ended" and e.get("user") == user]
    assert len(ended) == 1 and ended[0]["ended_address"] == "127.0.0.1"
    assert ended[0]["actor"] == f"portal:{user}"
