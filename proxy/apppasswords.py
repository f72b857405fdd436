"""App passwords: generation, normalisation, lookup keys and hashing.

An app password is 16 lowercase ASCII letters drawn from the OS's CSPRNG
(16 * log2(26) = 75.2 bits), shown once as four groups of four and accepted
with or without spaces, in any case.

Two things are stored for each, never the secret itself:

- a lookup key, ``HMAC-SHA256(pepper, user || 0x00 || secret)``, indexed and
  unique, so that finding the app password a secret belongs to costs one HMAC
  and one index lookup however many app passwords the user has;
- an argon2id hash, checked once the lookup key has matched, so that a copy
  of the database together with the pepper still does not give the secrets
  away cheaply.

The pepper lives in a file of its own, outside the database.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import string
import unicodedata
from pathlib import Path

import argon2
import attrs

SECRET_LENGTH = 16
GROUP = 4
ALPHABET = string.ascii_lowercase
PEPPER_BYTES = 32

# Characters clients put between the groups when a user types or pastes the
# secret: spaces, tabs, non-breaking spaces and hyphens.
_SEPARATORS = frozenset(" \t\u00a0\u2009\u202f-")
_DROP_SEPARATORS = {ord(c): None for c in _SEPARATORS}


def generate() -> str:
    """A new secret: 16 lowercase letters from the OS's CSPRNG."""
    return "".join(secrets.choice(ALPHABET) for _ in range(SECRET_LENGTH))


def display(secret: str) -> str:
    """``abcdefghijklmnop`` → ``abcd efgh ijkl mnop``."""
    return " ".join(secret[i : i + GROUP] for i in range(0, len(secret), GROUP))


def normalise(candidate: str) -> str | None:
    """The canonical form of a submitted secret, or None if it cannot be one.

    Separators are dropped and letters lowercased. Anything that is not then
    exactly 16 ASCII letters is not an app password (it may still be a
    primary password, which is not this module's concern).
    """
    if len(candidate) > 4 * SECRET_LENGTH:
        return None
    folded = candidate.translate(_DROP_SEPARATORS).lower()
    # ASCII and alphabetic after lower(): exactly a to z.
    if len(folded) != SECRET_LENGTH or not folded.isascii() or not folded.isalpha():
        return None
    return folded


def canonical_username(name: str) -> str:
    """The form under which a user's records are kept: NFC, trimmed, case-folded.

    Directory user names (uid, mail, userPrincipalName) compare without regard
    to case; keeping one form avoids two records for one person.
    """
    return unicodedata.normalize("NFC", name).strip().casefold()


def check_username(name: str) -> str | None:
    """What is wrong with a user name, or None if it can be stored."""
    if not name.strip():
        return "a user name must not be empty"
    if len(name) > 256:
        return "a user name must be at most 256 characters"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "a user name must not contain control characters"
    return None


def check_name(name: str) -> str | None:
    """What is wrong with an app password's name (its device), or None."""
    if not 1 <= len(name) <= 64:
        return "a name must be 1 to 64 characters"
    if not name.isprintable():
        return "a name must contain printable characters only"
    if name != name.strip():
        return "a name must not start or end with a space"
    return None


def lookup_key(pepper: bytes, username: str, secret: str) -> bytes:
    """``HMAC-SHA256(pepper, user || 0x00 || secret)`` for a canonical user and
    a normalised secret. User names never contain NUL, so the split is unique."""
    message = username.encode("utf-8") + b"\x00" + secret.encode("ascii")
    return hmac.digest(pepper, message, hashlib.sha256)


@attrs.frozen
class HashParameters:
    """argon2id parameters; see docs/security.md for why these values."""

    time_cost: int = 2
    memory_kib: int = 19456
    parallelism: int = 1

    def hasher(self) -> argon2.PasswordHasher:
        return argon2.PasswordHasher(
            time_cost=self.time_cost,
            memory_cost=self.memory_kib,
            parallelism=self.parallelism,
            hash_len=32,
            salt_len=16,
            type=argon2.Type.ID,
        )


class Hasher:
    """argon2id hashing and verification. Every call is CPU-bound: the daemon
    runs them in its bounded hashing pool, never on the reactor thread."""

    def __init__(self, parameters: HashParameters) -> None:
        self.parameters = parameters
        self._hasher = parameters.hasher()

    def hash(self, secret: str) -> str:
        return self._hasher.hash(secret)

    def verify(self, encoded: str, secret: str) -> bool:
        try:
            return self._hasher.verify(encoded, secret)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False

    def needs_rehash(self, encoded: str) -> bool:
        return self._hasher.check_needs_rehash(encoded)


class PepperError(Exception):
    """The pepper file is missing, unreadable, malformed or too widely readable."""


def load_pepper(path: Path, *, create: bool, what: str = "pepper") -> bytes:
    """Read the pepper (or another 32-byte key, named ``what`` in messages),
    creating it (mode 0600) if asked and it does not exist.

    Refuses a pepper that anyone but its owner may read or write: whoever
    holds it and a copy of the database can test guesses at HMAC speed.
    """
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as e:
            raise PepperError(f"{path}: cannot create the {what} file: {e.strerror}") from None
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(PEPPER_BYTES))
                f.flush()
                os.fsync(f.fileno())
            adopt_parent_owner(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise PepperError(f"{path}: the {what} file does not exist") from None
    except OSError as e:
        raise PepperError(f"{path}: cannot open the {what} file: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise PepperError(f"{path}: the {what} must be a regular file")
        if mode & 0o077:
            raise PepperError(
                f"{path}: the {what} file has mode {stat.S_IMODE(mode):04o}; "
                "it must be readable by its owner only (chmod 600)"
            )
        pepper = f.read(PEPPER_BYTES + 1)
    if len(pepper) != PEPPER_BYTES:
        raise PepperError(f"{path}: the {what} file must hold exactly {PEPPER_BYTES} bytes")
    return pepper


def adopt_parent_owner(path: Path) -> None:
    """When root creates a file in the daemon's state folder (an operator
    running the command line tool with sudo), hand it to the folder's owner so
    that the daemon, running as its own user, can still open it."""
    if os.geteuid() != 0:
        return
    parent = os.stat(Path(path).parent)
    if parent.st_uid != 0 or parent.st_gid != 0:
        os.chown(path, parent.st_uid, parent.st_gid)
