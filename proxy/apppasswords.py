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

import base64
import binascii
import functools
import hashlib
import hmac
import os
import secrets
import stat
import string
import threading
import unicodedata
from pathlib import Path
from typing import Any

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
_ASCII_SEPARATORS = sorted(c for c in _SEPARATORS if c.isascii())


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
    if candidate.isascii():  # a replace for each separator there: a fifth of translate's time
        folded = candidate
        for separator in _ASCII_SEPARATORS:
            folded = folded.replace(separator, "")
        folded = folded.lower()
    else:
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


class KeyedHash:
    """HMAC-SHA256 under one key (RFC 2104), the key's two padded hash
    states computed once: a message then costs two copies of a SHA-256
    state and two short hashes. ``hmac.digest`` makes OpenSSL 3 look up
    its HMAC implementation on every call, which in the daemon (its other
    threads, its large heap) cost 10 µs a sign-in where this costs under 1."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block = hashlib.sha256().block_size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\x00")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


@functools.lru_cache(maxsize=4)
def _keyed(pepper: bytes) -> KeyedHash:
    return KeyedHash(pepper)


def lookup_key(pepper: bytes, username: str, secret: str) -> bytes:
    """``HMAC-SHA256(pepper, user || 0x00 || secret)`` for a canonical user and
    a normalised secret. User names never contain NUL, so the split is unique."""
    return _keyed(pepper).digest(username.encode("utf-8") + b"\x00" + secret.encode("ascii"))


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


class _Memory:
    """Memory for argon2 runs, kept between them.

    An argon2id verify fills ``memory_kib`` of memory (19 MiB as shipped).
    The daemon has glibc give every buffer of 128 KiB or more a mapping of
    its own (:func:`proxy.runner.give_memory_back`), so each verify would map
    19 MiB afresh and fault every page in: 36 ms a verify instead of 22 here.
    argon2 takes the memory from these callbacks instead: buffers handed back
    after a run are kept for the next. :meth:`release_idle`, called now and
    then (the daemon: every 30 s, on its clock), lets go of those no run has
    taken since the call before, so an idle daemon holds none. Called from
    the hashing threads; the free list is under a lock."""

    def __init__(self) -> None:
        from argon2.low_level import ffi

        self._lock = threading.Lock()
        self._free: list[list[Any]] = []  # [size, buffer, taken since the last release]
        self._lent: dict[int, tuple[int, Any]] = {}  # address → (size, buffer)
        self._new = ffi.new_allocator(should_clear_after_alloc=False)

        @ffi.callback("int(uint8_t **, size_t)")
        def allocate(memory: Any, size: int) -> int:
            buffer = None
            with self._lock:
                for i, entry in enumerate(self._free):
                    if entry[0] == size:
                        buffer = self._free.pop(i)[1]
                        break
            if buffer is None:
                try:
                    buffer = self._new("uint8_t[]", size)
                except MemoryError:
                    return -22  # ARGON2_MEMORY_ALLOCATION_ERROR
            address = int(ffi.cast("uintptr_t", buffer))
            with self._lock:
                self._lent[address] = (size, buffer)
            memory[0] = buffer
            return 0

        @ffi.callback("void(uint8_t *, size_t)")
        def free(memory: Any, size: int) -> None:
            address = int(ffi.cast("uintptr_t", memory))
            with self._lock:
                lent = self._lent.pop(address, None)
                if lent is not None:
                    self._free.append([lent[0], lent[1], True])

        self.allocate = allocate
        self.free = free

    def release_idle(self) -> int:
        """Let go of buffers no run has taken since the last call; how many."""
        with self._lock:
            kept = [entry for entry in self._free if entry[2]]
            released = len(self._free) - len(kept)
            for entry in kept:
                entry[2] = False
            self._free = kept
        return released


_MEMORY: _Memory | None = None
_MEMORY_LOCK = threading.Lock()


def _memory() -> _Memory:
    """The process's one pool of argon2 memory (made on first use)."""
    global _MEMORY
    with _MEMORY_LOCK:
        if _MEMORY is None:
            _MEMORY = _Memory()
        return _MEMORY


def release_idle_memory() -> int:
    """Let go of argon2 memory no verify has used since the last call (the
    daemon calls this every 30 s); how many buffers."""
    return _MEMORY.release_idle() if _MEMORY is not None else 0


def _decode(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    """(memory KiB, time cost, lanes, salt, hash) of an argon2id v=19 hash in
    the PHC string format; None for anything else."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] or parts[1] != "argon2id" or parts[2] != "v=19":
        return None
    try:
        fields = dict(item.split("=", 1) for item in parts[3].split(","))
        memory, time_cost, lanes = int(fields["m"]), int(fields["t"]), int(fields["p"])
        salt = base64.b64decode(parts[4] + "=" * (-len(parts[4]) % 4), validate=True)
        digest = base64.b64decode(parts[5] + "=" * (-len(parts[5]) % 4), validate=True)
    except (ValueError, KeyError, binascii.Error):
        return None
    if len(fields) != 3 or not (0 < lanes <= 16 and 8 * lanes <= memory <= 1 << 22
                                and 0 < time_cost <= 64 and 8 <= len(salt) <= 64
                                and 16 <= len(digest) <= 64):
        return None
    return memory, time_cost, lanes, salt, digest


class Hasher:
    """argon2id hashing and verification. Every call is CPU-bound: the daemon
    runs them in its bounded hashing pool, never on the reactor thread."""

    def __init__(self, parameters: HashParameters) -> None:
        self.parameters = parameters
        self._hasher = parameters.hasher()

    def hash(self, secret: str) -> str:
        return self._hasher.hash(secret)

    def verify(self, encoded: str, secret: str) -> bool:
        decoded = _decode(encoded)
        if decoded is None:  # another form: the library's own verify
            try:
                return self._hasher.verify(encoded, secret)
            except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
                return False
        from argon2.low_level import ARGON2_VERSION, Type, core, ffi, lib

        pool = _memory()
        memory, time_cost, lanes, salt, digest = decoded
        password = secret.encode("utf-8")
        # Each buffer is held by a name until argon2 is done: cffi frees one
        # made inline in the dict below as soon as the context is built.
        out = ffi.new("uint8_t[]", len(digest))
        c_password = ffi.new("uint8_t[]", password)
        c_salt = ffi.new("uint8_t[]", salt)
        context = ffi.new("argon2_context *", dict(
            version=ARGON2_VERSION, out=out, outlen=len(digest),
            pwd=c_password, pwdlen=len(password),
            salt=c_salt, saltlen=len(salt),
            secret=ffi.NULL, secretlen=0, ad=ffi.NULL, adlen=0,
            t_cost=time_cost, m_cost=memory, lanes=lanes, threads=lanes,
            allocate_cbk=pool.allocate, free_cbk=pool.free,
            flags=lib.ARGON2_DEFAULT_FLAGS,
        ))
        ok = core(context, Type.ID.value) == lib.ARGON2_OK
        computed = bytes(ffi.buffer(out))
        del context, c_password, c_salt, out  # only now
        return ok and hmac.compare_digest(computed, digest)

    def needs_rehash(self, encoded: str) -> bool:
        return self._hasher.check_needs_rehash(encoded)


class PepperError(Exception):
    """The pepper file is missing, unreadable, malformed or too widely readable."""


def _create_key(path: Path, what: str) -> None:
    """Write a new key under a name of its own, then link it into place: a
    process reading ``path`` meanwhile finds no file or the whole key, never
    a part, and of two processes creating it at once one key wins."""
    path = Path(path)
    draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    try:
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise PepperError(f"{path}: cannot create the {what} file: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(PEPPER_BYTES))
            f.flush()
            os.fsync(f.fileno())
        adopt_parent_owner(draft)
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another process's key is the one
        except OSError as e:
            raise PepperError(f"{path}: cannot create the {what} file: {e.strerror}") from None
    finally:
        draft.unlink(missing_ok=True)


def load_pepper(path: Path, *, create: bool, what: str = "pepper") -> bytes:
    """Read the pepper (or another 32-byte key, named ``what`` in messages),
    creating it (mode 0600) if asked and it does not exist.

    Refuses a pepper that anyone but its owner may read or write: whoever
    holds it and a copy of the database can test guesses at HMAC speed.
    """
    if create and not os.path.lexists(path):
        _create_key(path, what)
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
