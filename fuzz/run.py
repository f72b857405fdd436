"""Run every fuzz target (or those named) for a set time each:

    .venv/bin/python -m fuzz.run --seconds 60 [ldap imap ...]

Each target runs in a process of its own under atheris (libFuzzer), from
its seed corpus in fuzz/corpus/TARGET (new inputs that reach new code are
kept in a temporary copy, not in the repository). A crash leaves its input
in fuzz/crashes/ and the run exits 1: add the input to the regression tests
(tests/unit/test_fuzz_regressions.py), fix, and run again.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = """
import sys, atheris
with atheris.instrument_imports():
    from fuzz.targets import TARGETS
target = TARGETS[sys.argv[1]]
def test_one_input(data):
    target(data)
atheris.Setup(sys.argv[1:2] + sys.argv[2:], test_one_input)
atheris.Fuzz()
"""


def main(argv: list[str] | None = None) -> int:
    from fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60, help="how long each target runs")
    parser.add_argument("targets", nargs="*", help=f"some of: {', '.join(TARGETS)}")
    args = parser.parse_args(argv)
    failed = []
    crashes = HERE / "crashes"
    crashes.mkdir(exist_ok=True)
    for name in args.targets or list(TARGETS):
        with tempfile.TemporaryDirectory() as work:
            corpus = Path(work) / "corpus"
            seeds = HERE / "corpus" / name
            if seeds.is_dir():
                shutil.copytree(seeds, corpus)
            else:
                corpus.mkdir()
            command = [sys.executable, "-c", CHILD, name, str(corpus),
                       f"-max_total_time={args.seconds}", "-rss_limit_mb=2048", "-timeout=10",
                       f"-artifact_prefix={crashes}/{name}-", "-print_final_stats=1"]
            done = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True)
            stats = [l for l in done.stderr.splitlines() if l.startswith(("stat::number_of_executed_units", "stat::new_units_added"))]
            runs = next((l.split(":")[-1].strip() for l in stats if "executed" in l), "?")
            print(f"{name}: {'ok' if done.returncode == 0 else 'CRASH'}, {runs} inputs in {args.seconds} s",
                  flush=True)
            if done.returncode != 0:
                failed.append(name)
                print(done.stderr[-3000:], file=sys.stderr)
    if failed:
        print(f"crashes in {', '.join(failed)}: inputs in {crashes}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
