import functools
import hashlib
import hmac
import os
import string

import pytest
from hypothesis import given, strategies as st

from proxy import apppasswords
from proxy.apppasswords import (
    HashParameters,
    KeyedHash,
    Hasher,
    PepperError,
    display,
    generate,
    load_pepper,
    lookup_key,
    normalise,
)

from tests.conftest import at_once

FAST = HashParameters(time_cost=1, memory_kib=64, parallelism=1)


def test_generated_secrets_are_16_lowercase_letters_and_differ():
    secrets = {generate() for _ in range(1000)}
    assert len(secrets) == 1000
    for s in secrets:
        assert len(s) == 16 and set(s) <= set(string.ascii_lowercase)
    # Every letter turns up: the alphabet is the whole of a-z.
    assert set("".join(secrets)) == set(string.ascii_lowercase)


def test_display_groups_four_by_four():
    assert display("abcdefghijklmnop") == "abcd efgh ijkl mnop"


@pytest.mark.parametrize(
    "typed",
    [
        "abcdefghijklmnop",
        "abcd efgh ijkl mnop",
        "ABCD EFGH IJKL MNOP",
        "AbCd-eFgH-iJkL-mNoP",
        " abcd\tefgh\u00a0ijkl mnop ",
    ],
)
def test_secrets_are_accepted_with_or_without_spaces_in_any_case(typed):
    assert normalise(typed) == "abcdefghijklmnop"


@pytest.mark.parametrize(
    "typed",
    ["", "abcdefghijklmno", "abcdefghijklmnopq", "abcdefghijklmn0p", "abcdéfghijklmnop",
     "correct horse battery staple", "a" * 10_000],
)
def test_what_cannot_be_an_app_password_normalises_to_none(typed):
    assert normalise(typed) is None


@given(st.text(alphabet=string.ascii_lowercase, min_size=16, max_size=16),
       st.lists(st.sampled_from([" ", "", "-", "\t"]), min_size=16, max_size=16),
       st.lists(st.booleans(), min_size=16, max_size=16))
def test_any_spacing_and_case_of_a_secret_normalises_to_it(secret, gaps, upper):
    typed = "".join(
        (c.upper() if u else c) + g for c, g, u in zip(secret, gaps, upper)
    )
    assert normalise(typed) == secret


def test_lookup_key_depends_on_pepper_user_and_secret():
    p1, p2 = b"\x01" * 32, b"\x02" * 32
    base = lookup_key(p1, "alice", "abcdefghijklmnop")
    assert len(base) == 32
    assert base == lookup_key(p1, "alice", "abcdefghijklmnop")
    assert base != lookup_key(p2, "alice", "abcdefghijklmnop")
    assert base != lookup_key(p1, "bob", "abcdefghijklmnop")
    assert base != lookup_key(p1, "alice", "abcdefghijklmnoq")


@given(st.binary(max_size=200), st.binary(max_size=300))
def test_the_keyed_hash_is_hmac_sha256(key, message):
    # Keys shorter than, as long as and longer than SHA-256's block.
    assert KeyedHash(key).digest(message) == hmac.digest(key, message, hashlib.sha256)


def test_lookup_key_is_hmac_sha256_of_user_nul_secret():
    pepper = os.urandom(32)
    assert lookup_key(pepper, "alice", "abcdefghijklmnop") == hmac.digest(
        pepper, b"alice\x00abcdefghijklmnop", hashlib.sha256)


def test_usernames_are_kept_in_one_form():
    assert apppasswords.canonical_username("  Alice@Example.TEST ") == "alice@example.test"
    assert apppasswords.check_username("a\nb") is not None
    assert apppasswords.check_username("a\x00b") is not None
    assert apppasswords.check_username(" ") is not None
    assert apppasswords.check_username("alice") is None


@pytest.mark.parametrize("name", ["", "x" * 65, "tab\there", " padded", "line\nbreak"])
def test_bad_device_names_are_refused(name):
    assert apppasswords.check_name(name) is not None


def test_good_device_names_pass():
    assert apppasswords.check_name("Outlook 2010 (laptop)") is None
    assert apppasswords.check_name("x" * 64) is None
    assert apppasswords.check_name("Drucker im Büro") is None


def test_hash_verifies_only_its_secret():
    hasher = Hasher(FAST)
    encoded = hasher.hash("abcdefghijklmnop")
    assert encoded.startswith("$argon2id$")
    assert "abcdefghijklmnop" not in encoded
    assert hasher.verify(encoded, "abcdefghijklmnop")
    assert not hasher.verify(encoded, "abcdefghijklmnoq")
    assert not hasher.verify("not a hash", "abcdefghijklmnop")


def test_changed_parameters_ask_for_a_rehash():
    old = Hasher(FAST).hash("abcdefghijklmnop")
    newer = Hasher(HashParameters(time_cost=2, memory_kib=64, parallelism=1))
    assert newer.needs_rehash(old)
    assert not Hasher(FAST).needs_rehash(old)
    assert newer.verify(old, "abcdefghijklmnop")


def test_default_parameters_are_the_documented_ones():
    assert HashParameters() == HashParameters(time_cost=2, memory_kib=19456, parallelism=1)


def test_pepper_is_created_private_and_read_back(tmp_path):
    path = tmp_path / "pepper"
    first = load_pepper(path, create=True)
    assert len(first) == 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_pepper(path, create=True) == first
    assert load_pepper(path, create=False) == first


def test_processes_creating_the_pepper_at_once_all_read_the_same_whole_one(tmp_path):
    for round in range(8):
        path = tmp_path / f"pepper-{round}"
        got = at_once(functools.partial(load_pepper, path, create=True), processes=3)
        assert got == [path.read_bytes()] * 3 and len(got[0]) == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"pepper-{r}" for r in range(8)]


def test_a_pepper_others_can_read_is_refused(tmp_path):
    path = tmp_path / "pepper"
    load_pepper(path, create=True)
    os.chmod(path, 0o644)
    with pytest.raises(PepperError, match="chmod 600") as raised:
        load_pepper(path, create=False)
    assert path.read_bytes().hex() not in str(raised.value)


def test_a_missing_or_malformed_pepper_is_refused(tmp_path):
    with pytest.raises(PepperError, match="does not exist"):
        load_pepper(tmp_path / "absent", create=False)
    short = tmp_path / "short"
    short.write_bytes(b"x" * 10)
    short.chmod(0o600)
    with pytest.raises(PepperError, match="32 bytes"):
        load_pepper(short, create=False)
    link = tmp_path / "link"
    link.symlink_to(short)
    with pytest.raises(PepperError):
        load_pepper(link, create=False)


def test_verify_agrees_with_argon2_and_keeps_its_memory_between_runs():
    import argon2

    from proxy import apppasswords as ap

    for parameters in (ap.HashParameters(time_cost=1, memory_kib=1024, parallelism=1),
                       ap.HashParameters(time_cost=2, memory_kib=2048, parallelism=2)):
        hasher = ap.Hasher(parameters)
        secret = ap.generate()
        encoded = hasher.hash(secret)
        assert hasher.verify(encoded, secret)
        assert argon2.PasswordHasher().verify(encoded, secret)
        for wrong in (ap.generate(), secret[:-1], secret + "a", ""):
            assert not hasher.verify(encoded, wrong)
        # Malformed or foreign forms never pass, and never raise.
        for bad in (encoded.replace("$v=19", ""), encoded[:-2], encoded.replace("argon2id", "argon2i"),
                    encoded + "$x", "", "$argon2id$v=19$m=1,t=1,p=1$$", "garbage"):
            assert not hasher.verify(bad, secret)
    memory = ap._memory()
    before = len(memory._free)
    assert before >= 1
    hasher.verify(encoded, secret)
    assert len(memory._free) == before  # the buffer was taken and handed back, not made anew
    # Used since the last release: kept; unused for a whole round: let go.
    assert ap.release_idle_memory() == 0 and len(memory._free) == before
    assert ap.release_idle_memory() == before
    assert memory._free == [] and memory._lent == {}
    assert hasher.verify(encoded, secret)


def test_verify_holds_its_buffers_while_argon2_runs():
    """The secret and salt given to argon2 stay alive until it is done: with
    other threads allocating meanwhile, a right secret is never refused."""
    import threading

    from proxy import apppasswords as ap

    hasher = ap.Hasher(ap.HashParameters(time_cost=1, memory_kib=256, parallelism=1))
    secret = ap.generate()
    encoded = hasher.hash(secret)
    results: list[bool] = []
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            [bytes(64) for _ in range(200)]

    def check() -> None:
        for _ in range(100):
            results.append(hasher.verify(encoded, secret))

    threads = [threading.Thread(target=churn) for _ in range(2)]
    threads += [threading.Thread(target=check) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads[2:]:
        t.join()
    stop.set()
    for t in threads[:2]:
        t.join()
    assert results == [True] * 300


# Between letters: nothing or a separator of either kind (ASCII or not),
# and sometimes what is none (an accented letter, a Kelvin sign that lowers
# to k, a digit, anything).
SEPARATED = st.just("") | st.sampled_from(list(" \t-\u00a0\u2009\u202f"))
OTHER = st.sampled_from(list("\u00e9\u0131\u212a1_")) | st.characters()


def typed_secrets(between, sizes):
    return st.lists(st.tuples(st.sampled_from("abcxyzABCXYZ"), between), min_size=sizes[0],
                    max_size=sizes[1]).map(lambda parts: "".join(c + b for c, b in parts))


@given(typed_secrets(SEPARATED, (16, 16)) | typed_secrets(SEPARATED | OTHER, (15, 17)))
def test_normalising_drops_the_same_separators_on_either_path(typed):
    """ASCII input goes a faster way (a replace for each separator); it
    gives what translating every separator away gives."""
    folded = typed.translate(apppasswords._DROP_SEPARATORS).lower()
    expected = (folded if len(typed) <= 64 and len(folded) == 16 and folded.isascii()
                and folded.isalpha() else None)
    assert normalise(typed) == expected
