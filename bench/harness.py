"""What every benchmark shares: where results go, the limits the load
generators need, starting them in processes of their own, and summing up."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"
PASSWORD = "Bench-Passw0rd"
# The load generators open thousands of sessions of a few users from one
# address, which the default limits refuse (as they should for real clients).
BENCH_LIMITS = ("limits:\n  max_sessions_per_user_and_source: 100000\n"
                "  max_connections_before_login: 1000000\n  max_connections: 1000000\n")


def best(function: Any, rounds: int) -> float:
    """µs a call: the best of five runs of ``rounds`` calls (in memory)."""
    times = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            function()
        times.append((time.perf_counter() - started) / rounds * 1e6)
    return min(times)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_load(kind: str, port: int, credentials: list[tuple[str, str]], *, connections: int,
               seconds: float, sources: bool = False) -> subprocess.Popen:
    """Start a load generator in a process of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.load", kind, "127.0.0.1", str(port),
         "--credentials", json.dumps(credentials), "--connections", str(connections),
         "--seconds", str(seconds), *(["--sources"] if sources else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


def result(process: subprocess.Popen, seconds: float) -> dict[str, Any]:
    out, err = process.communicate(timeout=seconds + 120)
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed: {err[-2000:]}")
    return json.loads(out)


def load(kind: str, port: int, credentials: list[tuple[str, str]], *, connections: int,
         seconds: float) -> dict[str, Any]:
    """Run a load generator in a process of its own; its JSON result."""
    return result(start_load(kind, port, credentials, connections=connections, seconds=seconds),
                  seconds)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
