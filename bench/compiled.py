"""What compiling the proxy with mypyc would save a bind, measured: the
modules as they are, built by mypyc into a temporary folder (no change to
the tree, no extension installed).

    .venv/bin/python -m bench.compiled [--rounds 100000]
    .venv/bin/python -m bench.compiled --core [--turns 3] [--seconds 6]

Needs mypy (its mypyc) and a C compiler: ``.venv/bin/pip install -e
'.[bench]'`` and Debian's ``gcc``; ``--core`` also what ``bench.profile``
needs (slapd and Dovecot, as ``./tests/run`` installs them, and py-spy).

Without ``--core``: ``proxy/wire/ber.py`` alone, and a warm LDAP bind's
calls timed on both, in memory, best of five: the framer cutting a simple
bind out of the stream (with its nesting check), the message and the bind
read, and the BindResponse made.

With ``--core``: every module of a cached bind's path that mypyc can build
(:data:`CORE`: the codec, the decision, the throttle, the audit), in a copy
of the package; then, in turns, interpreted and compiled, ``bench.decision``
(the decision in memory) and ``bench.profile ldap`` (the daemon's CPU a
bind under load). attrs classes stay Python classes in the copy (mypyc
checks a class attribute's value against its type, and ``attrs.field()``
is a marker until the class is made). The front ends are left out: mypyc
2.4.1 refuses a compiled class under Twisted's, stops with an internal
error on a closure in a class left to Python, and with both, writes C
that does not build.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import best

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "proxy" / "wire" / "ber.py"
NAME = "lapber"
# A cached bind's modules that mypyc builds (see the module's note).
CORE = ("proxy/wire/ber.py", "proxy/auth/authenticator.py", "proxy/auth/events.py",
        "proxy/auth/throttle.py", "proxy/auth/rules.py", "proxy/auth/accounts.py",
        "proxy/auth/usage.py", "proxy/auth/apps.py", "proxy/apppasswords.py", "proxy/audit.py",
        "proxy/daemon/auditing.py", "proxy/transports.py")
_ATTRS_CLASS = re.compile(r"^(\s*)@(attrs|attr)\.(frozen|define|mutable|s)\b", re.M)
_ATTRS_FIELD = re.compile(r"^(\s+\w+): [^=\n]+? = ((?:attrs|attr)\.(?:field|ib|Factory)\()", re.M)


def timings(ber: Any, rounds: int) -> dict[str, float]:
    from ldaptor.protocols import pureldap

    frame = pureldap.LDAPMessage(pureldap.LDAPBindRequest(
        dn=b"uid=alice,ou=people,dc=example,dc=test", auth=b"abcd efgh ijkl mnop"), id=7).toWire()
    framer = ber.Framer(65536, 32)

    def bind() -> Any:
        return ber.parse_bind(ber.parse_message(framer.feed(frame)[0]))

    return {
        "check_depth": best(lambda: ber.check_depth(frame, 32), rounds),
        "framer.feed": best(lambda: framer.feed(frame), rounds),
        "parse_message": best(lambda: ber.parse_message(frame), rounds),
        "a bind read (feed, message, bind)": best(bind, rounds),
        "result": best(lambda: ber.result(7, ber.BIND_RESPONSE, 0, ""), rounds),
    }


def build(folder: Path) -> Any:
    """The codec built by mypyc in ``folder``, imported under its own name."""
    package = folder / NAME
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(SOURCE, package / "ber.py")
    done = subprocess.run([_mypyc(), f"{NAME}/ber.py"], cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"mypyc failed:\n{done.stdout}{done.stderr}")
    sys.path.insert(0, str(folder))
    module = importlib.import_module(f"{NAME}.ber")
    spec = importlib.util.find_spec(f"{NAME}.ber")
    assert spec is not None and spec.origin is not None and spec.origin.endswith(".so"), \
        "the compiled module was not the one imported"
    return module


def _mypyc() -> str:
    mypyc = shutil.which("mypyc", path=str(Path(sys.executable).parent)) or shutil.which("mypyc")
    if mypyc is None:
        sys.exit("mypyc not found: .venv/bin/pip install -e '.[bench]'")
    return mypyc


def _python_classes(source: str) -> str:
    """``source`` with its attrs classes left to Python, their fields typed Any."""
    if not _ATTRS_CLASS.search(source):
        return source
    source = _ATTRS_CLASS.sub(lambda m: f"{m[1]}@_mypyc_attr(native_class=False)\n{m[0]}",
                              source)
    source = _ATTRS_FIELD.sub(lambda m: f"{m[1]}: _Any = {m[2]}", source)
    return source.replace("from __future__ import annotations\n",
                          "from __future__ import annotations\n\nfrom typing import Any as _Any\n\n"
                          "from mypy_extensions import mypyc_attr as _mypyc_attr\n", 1)


def build_core(folder: Path) -> None:
    """A copy of the package in ``folder`` with :data:`CORE` built by mypyc,
    and the benchmarks and tests it needs beside it."""
    shutil.copytree(ROOT / "proxy", folder / "proxy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("bench", "tests"):
        (folder / name).symlink_to(ROOT / name)
    for module in CORE:
        path = folder / module
        path.write_text(_python_classes(path.read_text()))
    done = subprocess.run([_mypyc(), "--follow-imports=silent", "--ignore-missing-imports",
                           *CORE], cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"mypyc failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
    missing = [m for m in CORE if not list((folder / m).parent.glob(Path(m).stem + ".*.so"))]
    assert not missing, f"not built: {missing}"


def _run(folder: Path, *args: str) -> str:
    """``python -m <args>`` with ``folder``'s package first on the path
    (the daemon bench.profile starts inherits it)."""
    env = {**os.environ, "PYTHONPATH": str(folder)}
    done = subprocess.run([sys.executable, "-m", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed in {folder}:\n"
                 f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def _decision_rows(text: str) -> dict[str, float]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[1].endswith(" µs"):
            rows[cells[0].strip()] = float(cells[1][:-3])
    return rows


def core(turns: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="lap-mypyc-core-") as name:
        folder = Path(name)
        (folder / "interpreted").mkdir()
        for part in ("proxy", "bench", "tests"):
            (folder / "interpreted" / part).symlink_to(ROOT / part)
        build_core(folder / "compiled")
        sides = {"interpreted": folder / "interpreted", "compiled": folder / "compiled"}
        decision: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        cpu: dict[str, list[float]] = {side: [] for side in sides}
        for turn in range(turns):
            for side, path in sides.items():
                decision[side].append(_decision_rows(_run(path, "bench.decision")))
                out = _run(path, "bench.profile", "ldap", "--seconds", str(seconds))
                report = json.loads(out[:out.index("\n}\n") + 2])
                cpu[side].append(report["proxy_cpu_ms"] * 1000)
                print(f"turn {turn + 1}, {side}: {cpu[side][-1]:.0f} µs CPU a bind", flush=True)
        print(f"\n| measured | {' | '.join(sides)} |\n| --- | --- | --- |")
        for row in decision["interpreted"][0]:
            if "without the fast path" in row:
                # bench.decision turns the fast path off by replacing the
                # class's method, which a compiled caller does not look up.
                continue
            cells = [", ".join(f"{t[row]:.1f}" for t in decision[side]) + " µs" for side in sides]
            print(f"| {row} (bench.decision) | {' | '.join(cells)} |")
        print("| the daemon's CPU a bind (bench.profile ldap) | " + " | ".join(
            ", ".join(f"{v:.0f}" for v in cpu[side]) + " µs" for side in sides) + " |")
        print(json.dumps({"decision": decision, "cpu_us": cpu}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100_000)
    parser.add_argument("--core", action="store_true",
                        help="the bind's modules in a copy of the package, in the daemon")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    if args.core:
        core(args.turns, args.seconds)
        return
    from proxy.wire import ber

    with tempfile.TemporaryDirectory(prefix="lap-mypyc-") as folder:
        compiled = build(Path(folder))
        interpreted_times = timings(ber, args.rounds)
        compiled_times = timings(compiled, args.rounds)
    print(f"{'µs a call':<36} {'interpreted':>12} {'mypyc':>8} {'ratio':>6}")
    for name, before in interpreted_times.items():
        after = compiled_times[name]
        print(f"{name:<36} {before:12.2f} {after:8.2f} {before / after:6.1f}")
    print(json.dumps({"interpreted": interpreted_times, "mypyc": compiled_times}))


if __name__ == "__main__":
    main()
