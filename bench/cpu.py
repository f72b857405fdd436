"""CPU time of the servers under test, from /proc/<pid>/stat.

A server is a process group (Dovecot's master and the processes it forks,
nginx's master and worker, the proxy alone): its CPU time is the sum over
the group's processes of their own user and system time and that of their
children already reaped. A process that was born and died between two
readings is then counted once, in its parent's reaped time; one alive at
both, by the difference of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _fields(pid: int | str) -> list[str]:
    # "pid (comm) state ppid pgrp ...": comm may hold anything, even ")".
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def group_cpu_seconds(pgid: int) -> float:
    """User and system CPU of process group ``pgid`` so far, reaped children
    included."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _fields(entry.name)
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:
            total += sum(int(value) for value in fields[11:15])
    return total / TICKS


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU of one process (all its threads) and its reaped
    children so far."""
    return sum(int(value) for value in _fields(pid)[11:15]) / TICKS
