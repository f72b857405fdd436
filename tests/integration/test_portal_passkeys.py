"""Passkeys in the portal, end to end: a real headless Chromium with its
virtual authenticator (WebAuthn through Selenium), the daemon's pages at
https://localhost (the test CA's certificate trusted by Chromium through its
SPKI hash: WebAuthn refuses a page with a certificate error), the real
slapd and Dovecot's mail sink.

A user registers two passkeys (one per authenticator), removes one, signs in
with the other after their password, passes the fresh check with it; a
clone (a counter gone back) is refused; the help desk removes their passkeys."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from selenium.webdriver.common.virtual_authenticator import (
    Credential, VirtualAuthenticatorOptions)

from tests.browser import Browser, screenshots_folder
from tests.conftest import audit_text, require_tool
from tests.integration.conftest import PRIMARY
from tests.integration.test_portal import enrol, sign_in
from tests.proxyd import ProxyDaemon, free_port, mail_backend

FRESH = 30  # portal.fresh_check, seconds: its least
NOT_VERIFIED = "That passkey did not answer as it should"


@pytest.fixture(scope="module")
def proxy(slapd, dovecot, tmp_path_factory):
    require_tool("chromium")
    require_tool("chromedriver")
    folder = tmp_path_factory.mktemp("proxy-passkeys")
    port = free_port()
    daemon = ProxyDaemon(folder, slapd, {"imap": mail_backend(folder, dovecot, "imap")}, extra=(
        "policy:\n"
        "  allow_user_app_passwords: true\n"
        "portal:\n"
        f"  endpoint: tcp:{port}:interface=127.0.0.1\n"
        f"  certificate: {folder / 'pki' / 'server.pem'}\n"
        f"  private_key: {folder / 'pki' / 'server.key'}\n"
        f"  mail_relay: smtp://127.0.0.1:{dovecot.sink_port}\n"
        "  mail_from: security@example.test\n"
        f"  fresh_check: {FRESH}s\n"
        f"  passkeys_origin: https://localhost:{port}\n"))
    daemon.ports["portal"] = port
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def spki_hash(pem: bytes) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes."""
    key = x509.load_pem_x509_certificate(pem).public_key()
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture
def browser(proxy, tmp_path):
    opened = []
    trusted = spki_hash((proxy.folder / "pki" / "server.pem").read_bytes())

    def make(shots: bool = False) -> Browser:
        b = Browser(f"https://localhost:{proxy.ports['portal']}", tmp_path / f"p{len(opened)}",
                    screenshots_folder() if shots else None,
                    arguments=(f"--ignore-certificate-errors-spki-list={trusted}",))
        opened.append(b)
        return b

    yield make
    for b in opened:
        b.close()


def authenticator(b: Browser) -> None:
    """A new security key plugged in (the previous one, if any, pulled out)."""
    try:
        b.driver.remove_virtual_authenticator()
    except Exception:
        pass  # none yet
    b.driver.add_virtual_authenticator(VirtualAuthenticatorOptions(
        has_resident_key=False, has_user_verification=True, is_user_verified=True))


def audit(proxy) -> list[dict]:
    return [json.loads(line) for line in audit_text(proxy.folder / "audit.log").splitlines()]


def raw(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        return text
    text = text.replace("+", "-").replace("/", "_").rstrip("=")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def register(b: Browser, name: str) -> None:
    b.open("/")
    b.press("Set up a passkey")
    assert b.path == "/passkeys/new", b.text()
    b.fill("name", name)
    if name == "Blue key":
        b.screenshot("passkey-new")
    b.press("Set up the passkey")
    assert b.path == "/", b.text()
    assert f"Your passkey “{name}” is set up" in b.text()


def test_passkeys_registered_removed_signed_in_with_fresh_check_and_reset(
        proxy, slapd, dovecot, unique, browser):
    uid, helper = unique("keys"), unique("desk")
    slapd.add_user(uid, PRIMARY, mail=f"{uid}@example.test")
    slapd.add_to_group(slapd.add_user(helper, PRIMARY), "admins")
    sent_before = len(dovecot.sink_messages())
    b = browser(shots=True)
    totp = enrol(b, uid)
    assert "You have no passkeys." in b.text("#passkeys")

    # Two passkeys, one on each of two keys (a key holds one per site).
    authenticator(b)
    register(b, "Blue key")
    authenticator(b)
    register(b, "Work laptop")
    assert [e.text.split(":")[0] for e in b.all("ul.passkeys li")] == ["Blue key", "Work laptop"]
    b.screenshot("passkeys")
    # Mailed: the authenticator app, then each passkey.
    mails = dovecot.wait_for_messages(3, since=sent_before)
    assert sum(b"A passkey was set up for " + uid.encode() in m.data for m in mails) == 2
    assert {(e["event"], e.get("passkey")) for e in audit(proxy)
            if e.get("user") == uid and e.get("method") == "passkey"} == {
        ("second_factor_enrolled", "Blue key"), ("second_factor_enrolled", "Work laptop")}

    # Remove the first (the key that holds it is gone already), confirmed.
    [blue] = [e for e in b.all("ul.passkeys li") if "Blue key" in e.text]
    b.click(blue.find_element("css selector", "a"))
    assert "Remove the passkey “Blue key”?" in b.text()
    b.press("Remove it")
    assert "Removed the passkey “Blue key”." in b.text()
    assert [e.text.split(":")[0] for e in b.all("ul.passkeys li")] == ["Work laptop"]

    # Sign in: the password, no code, then the passkey.
    b.press("Sign out")
    sign_in(b, uid)
    assert b.path == "/sign-in/passkey", b.text()
    b.screenshot("sign-in-passkey")
    b.press("Use a passkey")
    assert b.path == "/", b.text()
    assert "last used" in b.text("#passkeys")

    # The fresh check with the passkey, the page session older than fresh_check.
    time.sleep(FRESH + 2)
    b.fill("name", "Outlook")
    b.press("Create")
    assert b.path == "/confirm-it-is-you", b.text()
    b.press("Use a passkey instead")
    assert b.path == "/confirm-it-is-you/passkey", b.text()
    b.screenshot("confirm-it-is-you-passkey")
    b.press("Use a passkey")
    assert b.path == "/" and "Confirmed" in b.text(), b.text()
    b.fill("name", "Outlook")
    b.press("Create")
    assert "shown only this once" in b.text()

    # A clone of the key (its counter gone back) is refused.
    [held] = b.driver.get_credentials()
    assert held.sign_count >= 2
    # Selenium's Credential read back holds its id and key as base64 text.
    b.driver.remove_all_credentials()
    b.driver.add_credential(Credential.create_non_resident_credential(
        raw(held._id), held.rp_id, raw(held._private_key), 0))
    b.press("Sign out")
    sign_in(b, uid)
    b.press("Use a passkey")
    assert b.path == "/sign-in/passkey" and NOT_VERIFIED in b.text(), b.text()

    # The help desk removes the user's passkeys; the user is told.
    desk = browser()
    enrol(desk, helper)
    desk.open(f"/helpdesk/users/{uid}")
    assert "Work laptop" in desk.text()
    desk.press("Reset passkeys")
    assert f"Remove every passkey of {uid}?" in desk.text()
    desk.press("Remove them")
    assert f"Removed 1 passkeys of {uid}" in desk.text(), desk.text()
    mails = dovecot.wait_for_messages(4, since=sent_before)
    assert any(b"The help desk removed the passkeys of " + uid.encode() in m.data for m in mails)

    # Without passkeys, the user signs in with the authenticator app again.
    sign_in(b, uid)
    assert b.path == "/sign-in", b.text()  # no code: not signed in
    sign_in(b, uid, code=totp.now())
    assert b.path == "/" and "You have no passkeys." in b.text("#passkeys")

    events = audit(proxy)
    signs = [(e["outcome"], e.get("method")) for e in events
             if e["event"] == "portal_sign_in" and e.get("user") == uid]
    assert ("accepted", "passkey") in signs and ("refused", "passkey") in signs
    checks = [(e["outcome"], e["method"]) for e in events
              if e["event"] == "portal_fresh_check" and e.get("user") == uid]
    assert checks == [("accepted", "passkey")]
    assert [(e.get("actor"), e.get("count")) for e in events
            if e["event"] == "second_factor_reset" and e.get("user") == uid] == [
        (f"portal:{helper}", 1)]
    assert any(e["event"] == "passkey_removed" and e.get("passkey") == "Blue key"
               for e in events)
