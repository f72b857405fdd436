"""Imports run one way, from the entry points down: a module may import from
its own package or from a lower layer, never from a higher one, and never
sideways into another part of its own layer. Every module under proxy/ is
placed here by name: a new module is in no layer until someone decides which,
and until then this test fails and says where to add it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"

# Lowest first. Each part is a module or a package (its modules with it);
# ``proxy`` is the package's face (proxy/__init__.py) alone, not a catch-all.
# Parts of one layer do not import each other: where one needs another, the
# needed one goes a layer lower. docs/architecture.md's table follows this.
LAYERS = [
    ("codecs and the protocol registry", ["proxy", "proxy.wire", "proxy.protocols"]),
    ("plumbing", ["proxy.transports", "proxy.threads", "proxy.apppasswords", "proxy.config",
                  "proxy.pki", "proxy.metrics", "proxy.twistedcheck", "proxy.moves",
                  "proxy.reactor"]),
    ("plumbing over plumbing", ["proxy.tls", "proxy.audit", "proxy.secondfactor",
                                "proxy.splice"]),
    ("the HTTP client", ["proxy.webclient"]),
    ("store, directory and backends", ["proxy.store", "proxy.directory", "proxy.backends"]),
    ("the core", ["proxy.auth", "proxy.sessions", "proxy.admin"]),
    # Beside the portal, one step below it: the portal's app mounts it.
    ("the REST API", ["proxy.api"]),
    ("front ends and the portal", ["proxy.frontends", "proxy.portal"]),
    ("opening the store and secrets", ["proxy.bootstrap"]),
    ("the daemon's parts", ["proxy.daemon"]),
    ("the daemon", ["proxy.service"]),
    ("running the daemon", ["proxy.runner"]),
    ("the demo", ["proxy.demo"]),
    ("the command line", ["proxy.cli"]),
    ("python -m proxy", ["proxy.__main__"]),
]


class Unplaced(LookupError):
    pass


def covers(part: str, module: str) -> bool:
    return module == part or (part != "proxy" and module.startswith(part + "."))


def place_of(module: str) -> tuple[int, str]:
    """The layer (its index) and the listed part a module belongs to."""
    found = [(index, part) for index, (_, parts) in enumerate(LAYERS)
             for part in parts if covers(part, module)]
    if not found:
        raise Unplaced(f"{module} is in no layer: add it to LAYERS in tests/unit/test_layers.py "
                       f"(and to the layer table in docs/architecture.md)")
    return max(found, key=lambda f: len(f[1]))


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


MODULES = dict(modules())


def resolve(target: str) -> str | None:
    """The module an import names: ``proxy.store.AppPassword`` is proxy.store."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def imports(name: str, path: Path):
    """Every proxy module ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            module = resolve(target) if target.split(".")[0] == "proxy" else None
            if module is not None and module != name:
                yield module, node.lineno


def test_every_module_is_placed_in_a_layer():
    unplaced = []
    for name in MODULES:
        try:
            place_of(name)
        except Unplaced as e:
            unplaced.append(str(e))
    assert not unplaced, "\n".join(unplaced)


def test_a_new_module_is_in_no_layer_until_placed():
    with pytest.raises(Unplaced, match="add it to LAYERS in tests/unit/test_layers.py"):
        place_of("proxy.newly_written")
    with pytest.raises(Unplaced):
        place_of("proxy.portal_helpers")  # a prefix of a name is not its package
    assert place_of("proxy.wire.ber") == (0, "proxy.wire")
    assert place_of("proxy") == (0, "proxy")


def test_every_listed_part_exists():
    missing = [part for _, parts in LAYERS for part in parts if part not in MODULES]
    assert not missing, f"listed in LAYERS but not in proxy/: {missing}"


def test_no_import_runs_upward_or_sideways():
    wrong = []
    for name, path in MODULES.items():
        own, own_part = place_of(name)
        for target, line in imports(name, path):
            theirs, their_part = place_of(target)
            if theirs > own:
                how = "upward"
            elif theirs == own and their_part != own_part and their_part != "proxy":
                how = "sideways"
            else:
                continue
            wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} ({LAYERS[own][0]}) "
                         f"imports {target} ({LAYERS[theirs][0]}): {how}")
    assert not wrong, "imports that run upward or sideways:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = {name: {target for target, _ in imports(name, path)} for name, path in MODULES.items()}
    seen: set[str] = set()

    def walk(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = trail[trail.index(name):] + [name]
            pytest.fail("an import cycle: " + " -> ".join(cycle))
        if name in seen:
            return
        for target in sorted(graph[name]):
            walk(target, trail + [name])
        seen.add(name)

    for name in sorted(graph):
        walk(name, [])


def test_the_wire_imports_nothing_of_the_proxy_but_itself():
    for name, path in MODULES.items():
        if name.startswith("proxy.wire") or name == "proxy.protocols":
            for target, line in imports(name, path):
                assert target.startswith("proxy.wire"), f"{path}:{line} imports {target}"
