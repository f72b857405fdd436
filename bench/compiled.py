"""What compiling the BER codec with mypyc would save a bind, measured:
``proxy/wire/ber.py`` as it is, built by mypyc into a temporary folder (no
change to the tree, no extension installed), and the same calls timed on
both, in memory, best of five.

    .venv/bin/python -m bench.compiled [--rounds 100000]

Needs mypy (its mypyc) and a C compiler: ``.venv/bin/pip install -e
'.[bench]'`` and Debian's ``gcc``. The calls are a warm LDAP bind's: the
framer cutting a simple bind out of the stream (with its nesting check), the
message and the bind read, and the BindResponse made.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import best

SOURCE = Path(__file__).resolve().parent.parent / "proxy" / "wire" / "ber.py"
NAME = "lapber"


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
    mypyc = shutil.which("mypyc", path=str(Path(sys.executable).parent)) or shutil.which("mypyc")
    if mypyc is None:
        sys.exit("mypyc not found: .venv/bin/pip install -e '.[bench]'")
    done = subprocess.run([mypyc, f"{NAME}/ber.py"], cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"mypyc failed:\n{done.stdout}{done.stderr}")
    sys.path.insert(0, str(folder))
    module = importlib.import_module(f"{NAME}.ber")
    spec = importlib.util.find_spec(f"{NAME}.ber")
    assert spec is not None and spec.origin is not None and spec.origin.endswith(".so"), \
        "the compiled module was not the one imported"
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100_000)
    args = parser.parse_args()
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
