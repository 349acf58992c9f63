"""The import layering of gsd/ (docs/architecture.md, whose floor table this test reads) and
of gsd_kernels, which never imports gsd: a small AST check, no dependency.

Each module sits on a floor; it may import modules of its own floor or below, never above.
On top of that: no import cycle, only the command layer imports gsd.cli, and no command
module imports another. Every import statement counts, also those inside functions, so a
lazy import cannot hide an edge. A new module must be given a floor in docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GSD = Path(__file__).resolve().parents[2] / "gsd" if (Path(__file__).parent.name == "engine") \
    else Path(__file__).resolve().parents[2] / "gsd"

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def floors_from_docs(text: str) -> list[tuple[str, list[str]]]:
    """The floor table of docs/architecture.md, lowest floor first: (label, modules), a name
    ending in ".*" a whole package. The docs show what this test checks: one table for both."""
    body = text.split("<!-- floors: begin")[1].split("<!-- floors: end -->")[0]
    rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| floor")]
    out = []
    for row in rows:
        label, modules = (cell.strip() for cell in row.strip("|").split("|")[:2])
        names = [m.strip().strip("`") for m in modules.split(",")]
        out.append((label, [n if n == "gsd" else f"gsd.{n}" for n in names]))
    return list(reversed(out))


FLOORS = floors_from_docs(ARCHITECTURE.read_text())
COMMAND_LAYER = set(FLOORS[-1][1])
COMMANDS = COMMAND_LAYER - {"gsd.cli", "gsd.console"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, name: str, known: set[str]) -> set[str]:
    """The gsd modules `source` (module `name`) imports, anywhere in the file."""
    package = name if name in known and any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from gsd import runs` imports the module gsd.runs
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return {m for m in out if m in known and m != name}


def floor_of(name: str) -> int | None:
    for i, (_label, members) in enumerate(FLOORS):
        for m in members:
            if name == m or (m.endswith(".*") and (name == m[:-2] or name.startswith(m[:-1]))):
                return i
    return None


def graph_of(sources: dict[str, str]) -> dict[str, set[str]]:
    known = set(sources)
    return {name: imports_of(src, name, known) for name, src in sources.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for name, deps in sorted(graph.items()):
        f = floor_of(name)
        if f is None:
            out.append(f"{name} has no floor in docs/architecture.md's floor table")
            continue
        for d in sorted(deps):
            fd = floor_of(d)
            if fd is not None and fd > f:
                out.append(f"{name} ({FLOORS[f][0]}) imports the higher {d} ({FLOORS[fd][0]})")
            if d == "gsd.cli" and name not in COMMAND_LAYER:
                out.append(f"library module {name} imports gsd.cli")
            if name in COMMANDS and d in COMMANDS:
                out.append(f"command {name} imports command {d}")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def gsd_sources() -> dict[str, str]:
    return {module_name(p, GSD): p.read_text() for p in sorted(GSD.rglob("*.py"))}


def test_gsd_follows_its_layers():
    sources = gsd_sources()
    assert "gsd.train" in sources and "gsd.models.networks" in sources  # the walk found the package
    assert violations(graph_of(sources)) == []


@pytest.mark.parametrize("module, source, expected", [
    ("gsd.models.networks", "from gsd.evaluation.metrics import frechet_distance", "imports the higher"),
    ("gsd.sampling.samplers", "def f():\n    from gsd.cli import UsageError\n", "library module gsd.sampling.samplers imports gsd.cli"),
    ("gsd.evaluate", "from gsd import train", "command gsd.evaluate imports command gsd.train"),
    ("gsd.runs", "from .data import load_dataset", None),  # same floor: allowed (and no cycle on its own)
    ("gsd.brand_new", "", "has no floor"),
])
def test_the_check_catches_a_synthetic_violation(module, source, expected):
    sources = gsd_sources()
    sources[module] = source
    found = violations(graph_of(sources))
    if expected is None:
        assert found == []
    else:
        assert any(expected in v for v in found), found


def test_the_check_catches_a_cycle():
    sources = gsd_sources()
    sources["gsd.data"] += "\nfrom gsd.runs import read_config\n"
    sources["gsd.runs"] += "\nfrom gsd import data\n"
    found = violations(graph_of(sources))
    assert any(v.startswith("import cycle:") and "gsd.data" in v and "gsd.runs" in v for v in found), found


def engine_imports(root: Path) -> list[str]:
    """Every import of gsd (the engine) in the Python files under `root`, anywhere in a file."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(root)} imports {n}" for n in names if n == "gsd" or n.startswith("gsd.")]
    return found


def test_the_kernels_never_import_the_engine():
    """gsd_kernels sits below gsd: none of its modules imports gsd."""
    kernels = GSD.parent / "gsd_kernels"
    assert len(list(kernels.rglob("*.py"))) > 5  # the walk found the package
    assert engine_imports(kernels) == []


def test_the_kernel_check_catches_an_engine_import(tmp_path):
    (tmp_path / "ok.py").write_text("import gsd_kernels\nfrom gsd_kernels.reference import isometry_loss\n")
    (tmp_path / "bad.py").write_text("def f():\n    from gsd.config import RUN_DEFAULTS\n")
    (tmp_path / "worse.py").write_text("import gsd.runs\n")
    assert engine_imports(tmp_path) == ["bad.py imports gsd.config", "worse.py imports gsd.runs"]
