"""How long one argon2id verify takes here, for the shipped parameters and
the alternatives docs/security.md weighs.

    python bench/hashing.py [--rounds N]

Prints, for each parameter set, the median and min-max verify time over N
rounds (each the mean of a batch), and the cold-login ceiling that follows:
CPU cores / verify time (an upper bound where parallelism > 1, as one
verify then keeps several cores busy).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from proxy.apppasswords import HashParameters, Hasher, generate

CANDIDATES = [
    ("shipped default (OWASP 2023 minimum)", HashParameters(2, 19456, 1)),
    ("OWASP alternative, less memory", HashParameters(3, 12288, 1)),
    ("RFC 9106 second choice, argon2-cffi default", HashParameters(3, 65536, 4)),
]


def measure(parameters: HashParameters, rounds: int, batch: int) -> list[float]:
    hasher = Hasher(parameters)
    secret = generate()
    encoded = hasher.hash(secret)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batch):
            assert hasher.verify(encoded, secret)
        times.append((time.perf_counter() - start) / batch)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=5)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"machine: {platform.machine()}, {cores} cores, Python {platform.python_version()}")
    print(f"{'parameters':44} {'t':>2} {'m KiB':>7} {'p':>2} {'verify ms (min-max)':>22} {'logins/s':>9}")
    for label, parameters in CANDIDATES:
        times = measure(parameters, args.rounds, args.batch)
        median = statistics.median(times)
        spread = f"{median * 1e3:.1f} ({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})"
        print(f"{label:44} {parameters.time_cost:>2} {parameters.memory_kib:>7} "
              f"{parameters.parallelism:>2} {spread:>22} {cores / median:>9.0f}")


if __name__ == "__main__":
    main()
