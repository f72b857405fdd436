"""Every fuzz target on its seed corpus and on every input a fuzzing run
ever found (fuzz/corpus/TARGET): none may raise. A crash `python -m
fuzz.run` finds is added to the corpus, so it stays fixed."""

from pathlib import Path

import pytest

from fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parents[2] / "fuzz" / "corpus"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_corpus_passes(name):
    inputs = sorted((CORPUS / name).iterdir())
    assert inputs, f"no seed for {name} in {CORPUS / name}"
    for path in inputs:
        TARGETS[name](path.read_bytes())
