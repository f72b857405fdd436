"""Imports run one way: entry points → front ends → core → store and
directory; front ends → backends → wire. A module may import from its own
layer or any layer below it, never above."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"

# Lowest first. A module's layer is that of its longest listed prefix.
LAYERS = [
    ("codecs and the protocol registry", ["proxy.wire", "proxy.protocols"]),
    ("plumbing", ["proxy.transports", "proxy.tls", "proxy.threads", "proxy.apppasswords",
                  "proxy.config", "proxy.audit", "proxy.pki", "proxy.metrics"]),
    ("store, directory and backends", ["proxy.store", "proxy.directory", "proxy.backends"]),
    ("the core", ["proxy.auth", "proxy.sessions", "proxy.admin"]),
    ("front ends", ["proxy.frontends"]),
    ("entry points", ["proxy.service", "proxy.cli", "proxy.runner", "proxy.demo",
                      "proxy.__main__", "proxy"]),
]


def layer_of(module: str) -> int:
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} belongs to no layer: add it to LAYERS"
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imports(name: str, path: Path):
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # from proxy import config
                yield f"{target}.{alias.name}", node.lineno


def test_no_import_runs_upward():
    wrong = []
    for name, path in modules():
        own = layer_of(name)
        for target, line in imports(name, path):
            if not target.startswith("proxy.") or target == "proxy":
                continue
            try:
                theirs = layer_of(target)
            except AssertionError:
                continue  # "from proxy.x import name": the name is not a module
            if theirs > own:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} "
                             f"({LAYERS[own][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not wrong, "imports that run upward:\n" + "\n".join(wrong)


def test_the_wire_imports_nothing_of_the_proxy_but_itself():
    for name, path in modules():
        if name.startswith("proxy.wire") or name == "proxy.protocols":
            for target, line in imports(name, path):
                assert not target.startswith("proxy.") or target.startswith("proxy.wire"), \
                    f"{path}:{line} imports {target}"
