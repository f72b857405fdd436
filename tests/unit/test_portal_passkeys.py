"""The portal's passkeys, the parts with no browser: the relying party from
portal.passkeys_origin, ids in URLs, the user handle, the mails; the store's
part is in tests/unit/test_store.py (the contract, also on PostgreSQL)."""

from __future__ import annotations

import email

import pytest

from proxy.config import ConfigError, parse
from proxy.portal import notify
from proxy.portal.passkeys import credential_id, relying_party, user_handle
from proxy.store import Passkey


def test_the_relying_party_is_the_origins_host_name():
    rp = relying_party("https://security.example.org:8443", "Security info")
    assert (rp.id, rp.name) == ("security.example.org", "Security info")


def test_an_origin_with_a_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="passkeys_origin"):
        parse("portal:\n  passkeys_origin: https://security.example.org/portal\n",
              tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="passkeys_origin"):
        parse("portal:\n  passkeys_origin: http://security.example.org\n", tmp_path / "c.yaml")
    config = parse("portal:\n  passkeys_origin: https://security.example.org\n",
                   tmp_path / "c.yaml")
    assert config.portal.passkeys_origin == "https://security.example.org"


def test_a_passkeys_id_in_a_url_comes_back_as_its_credential_id():
    for raw in (b"\xff\xfe" * 8, b"a" * 17, bytes(range(64))):
        key = Passkey(raw, "alice", "laptop", b"")
        assert "=" not in key.id and "/" not in key.id and "+" not in key.id
        assert credential_id(key.id) == raw
    assert credential_id("not base64!") in (None, b"\x9e\x8b^\x1b\xac\x1f\xa9\xec")


def test_the_user_handle_is_stable_and_not_the_name():
    assert user_handle("alice") == user_handle("alice") != user_handle("bob")
    assert b"alice" not in user_handle("alice") and len(user_handle("alice")) == 32


def test_the_mails_say_what_happened_and_to_whom():
    added = email.message_from_bytes(notify.passkey_message(
        sender="security@example.test", to="alice@example.test", username="alice", at=0.0,
        address="192.0.2.7", title="Security info", kind=notify.PASSKEY_ADDED, name="Blue key"))
    assert added["Subject"] == "A passkey was set up for alice"
    body = added.get_payload()
    assert '"Blue key"' in body and "192.0.2.7" in body and "1970-01-01 at 00:00 UTC" in body
    reset = email.message_from_bytes(notify.passkey_message(
        sender="security@example.test", to="alice@example.test", username="alice", at=0.0,
        address="192.0.2.9", title="Security info", kind=notify.PASSKEYS_RESET, by="bob"))
    assert reset["Subject"] == "The help desk removed the passkeys of alice"
    assert "(bob)" in reset.get_payload()
