"""The architecture as a test: one-way imports between packages, no import cycle between files,
rooms of a readable size (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("gptjt_core", "gptjt_proto", "coordinator", "worker", "gptjt_cli", "bench", "local_swarm")
GENERATED = ("gptjt_proto",)  # protoc's output: not ours to size
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def product_files() -> dict[str, Path]:
    """module name -> file, for every module of our packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that `name` imports, at module level or inside functions (a lazy import is an
    import all the same). A package a module sits in is not counted: Python runs every parent
    package's __init__ first, whoever imports what."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = product_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def package_of(module: str) -> str:
    return module.split(".")[0]


def test_no_import_cycle_between_files():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_dependencies_point_one_way():
    edges = graph()

    def imported(src: str, dst: str) -> list[str]:
        return sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs
                      if package_of(a) == src and package_of(b) == dst)

    for other in PACKAGES:
        if other != "gptjt_core":
            assert imported("gptjt_core", other) == [], f"gptjt_core imports {other}"
    assert imported("worker", "coordinator") == [] and imported("coordinator", "worker") == []
    assert not (imported("gptjt_cli", "bench") and imported("bench", "gptjt_cli")), imported("bench", "gptjt_cli")
    for low in ("gptjt_core", "gptjt_proto", "coordinator", "worker"):
        for high in ("gptjt_cli", "bench", "local_swarm"):
            assert imported(low, high) == [], f"{low} imports the tools above it"


def test_codecs_know_no_protobuf_and_the_scheduler_does_no_io():
    edges = graph()
    assert not any(package_of(m) == "gptjt_proto" for m in edges["gptjt_core.compression"])
    for pure in ("coordinator.scheduler", "coordinator.placement", "coordinator.placement_exact",
                 "coordinator.placement_moves", "coordinator.placement_baselines", "coordinator.cost_model",
                 "coordinator.plan_horizon",
                 "coordinator.liveness", "coordinator.ledger.rules", "gptjt_core.schedule"):
        source = product_files()[pure].read_text()
        for io in ("import grpc", "import sqlite3", "import socket", " open(", "subprocess", "Path("):
            assert io not in source, f"{pure} does I/O ({io})"


def test_rooms_stay_small():
    too_long = []
    for name, path in product_files().items():
        if package_of(name) in GENERATED:
            continue
        source = path.read_text()
        if len(source.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}(): {length} lines")
    assert too_long == []
