"""The portal's second factor: TOTP (RFC 6238), with its keys sealed at rest.

A user's TOTP key is generated here (160 bits from the OS's CSPRNG, the size
RFC 4226 recommends), shown once as a QR code and in text, and stored only
sealed: AES-256-GCM under a key of its own, kept in a file beside the pepper
(``store.totp_key_file``), with the user name as associated data so that a
sealed key copied onto another user's row does not open. A copy of the
database alone gives no one a second factor.

A code is accepted for the current 30-second step or the one before or after
(clock drift), and each step only once: the store keeps the last step used
and takes a new one with a compare-and-set, so a code seen over a shoulder
or replayed by a phishing proxy is refused the second time, on every node.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

import pyotp
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy import apppasswords

STEP = 30
DIGITS = 6
DRIFT = 1  # steps either side of now
_NONCE = 12


class SealError(Exception):
    """A sealed key that does not open: another key file, or a damaged row."""


class KeyBox:
    """Seals and opens users' TOTP keys with the key in ``store.totp_key_file``."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def load(cls, path: Path, *, create: bool) -> KeyBox:
        """Read the key file (made, mode 0600, if asked and missing). Raises
        :class:`proxy.apppasswords.PepperError` with the file's name."""
        return cls(apppasswords.load_pepper(path, create=create, what="TOTP key"))

    def seal(self, username: str, totp_key: str) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._aead.encrypt(nonce, totp_key.encode("ascii"), username.encode("utf-8"))

    def open(self, username: str, sealed: bytes) -> str:
        try:
            plain = self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], username.encode("utf-8"))
        except Exception:
            raise SealError(f"the TOTP key of {username} does not open with this key file") from None
        return plain.decode("ascii")


def new_key() -> str:
    """A new TOTP key in base32 (what authenticator apps take): 160 bits."""
    return pyotp.random_base32(32)


def grouped(key: str) -> str:
    """``ABCDEFGH...`` → ``ABCD EFGH ...``, for typing into an app by hand."""
    return " ".join(key[i : i + 4] for i in range(0, len(key), 4))


def provisioning_uri(key: str, username: str, issuer: str) -> str:
    """The ``otpauth://`` URI an authenticator app reads from the QR code."""
    return pyotp.TOTP(key, digits=DIGITS, interval=STEP).provisioning_uri(
        name=username, issuer_name=issuer
    )


def step_of(now: float) -> int:
    return int(now // STEP)


def matching_step(key: str, code: str, now: float) -> int | None:
    """The time step ``code`` belongs to, within the allowed drift, or None.

    Every candidate is computed and compared in constant time, so the answer
    takes as long whichever step (if any) matched."""
    code = "".join(code.split())
    if len(code) != DIGITS or not code.isascii() or not code.isdigit():
        return None
    totp = pyotp.TOTP(key, digits=DIGITS, interval=STEP)
    current = step_of(now)
    found = None
    for step in range(current - DRIFT, current + DRIFT + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            found = step
    return found
