"""TOTP keys sealed at rest, codes matched within the drift, once."""

from __future__ import annotations

import pyotp
import pytest

from proxy import secondfactor
from proxy.apppasswords import PepperError
from proxy.secondfactor import KeyBox, SealError


def test_a_sealed_key_opens_only_for_its_user_and_key_file(tmp_path):
    box = KeyBox.load(tmp_path / "totp-key", create=True)
    assert (tmp_path / "totp-key").stat().st_mode & 0o777 == 0o600
    key = secondfactor.new_key()
    sealed = box.seal("alice", key)
    assert key.encode() not in sealed
    assert box.open("alice", sealed) == key
    with pytest.raises(SealError) as error:
        box.open("bob", sealed)  # moved onto another user's row
    assert key not in str(error.value)
    with pytest.raises(SealError):
        KeyBox(b"\x01" * 32).open("alice", sealed)  # another key file
    with pytest.raises(SealError):
        box.open("alice", sealed[:-1] + bytes([sealed[-1] ^ 1]))


def test_the_key_file_is_refused_when_others_can_read_it(tmp_path):
    path = tmp_path / "totp-key"
    KeyBox.load(path, create=True)
    path.chmod(0o644)
    with pytest.raises(PepperError, match="TOTP key file has mode 0644"):
        KeyBox.load(path, create=False)


def test_codes_match_within_one_step_either_side():
    key = secondfactor.new_key()
    totp = pyotp.TOTP(key)
    now = 1_800_000_015.0
    step = secondfactor.step_of(now)
    for offset in (-1, 0, 1):
        code = totp.at(now + 30 * offset)
        assert secondfactor.matching_step(key, code, now) == step + offset
        assert secondfactor.matching_step(key, code[:3] + " " + code[3:], now) == step + offset
    assert secondfactor.matching_step(key, totp.at(now + 60), now) is None
    assert secondfactor.matching_step(key, totp.at(now - 60), now) is None
    for bad in ("", "12345", "1234567", "abcdef", "١٢٣٤٥٦"):
        assert secondfactor.matching_step(key, bad, now) is None


def test_the_provisioning_uri_names_the_issuer_and_user():
    uri = secondfactor.provisioning_uri("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", "alice@example.org", "Example Mail")
    assert uri.startswith("otpauth://totp/Example%20Mail:alice%40example.org?")
    assert "secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP" in uri and "issuer=Example%20Mail" in uri
    assert secondfactor.grouped("ABCDEFGHIJ") == "ABCD EFGH IJ"
