"""The house plan, checked: every import between the project's modules (module level and inside functions alike)
goes down or sideways, never up, and no chain of imports comes back to where it started.

Floors, lowest first. ``trainer_core`` never imports ``orchestrator`` (nor Ray: tests/trainer_core/test_no_ray.py).
Inside ``trainer_core``: base modules (``paths``, ``metrics``) < ``config`` < ``data`` < ``model`` < ``fastpath``
< ``fold``. Inside ``orchestrator``: ``reporting`` < ``runs``, ``sweep``, ``perf``, ``tracking`` < ``cluster`` < the
command-line modules at the top (``cv``, ``tune``, ``predict``, ...). A module may import its own room and any lower
floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

FLOORS = {
    "trainer_core": 0, "trainer_core.paths": 0, "trainer_core.metrics": 0,
    "trainer_core.logs": 0,
    "trainer_core.config": 1, "trainer_core.data": 2, "trainer_core.model": 3, "trainer_core.fastpath": 4,
    "trainer_core.fold": 5,
    "orchestrator.reporting": 10, "orchestrator.runs": 11, "orchestrator.sweep": 11, "orchestrator.perf": 11,
    "orchestrator.tracking": 11,
    "orchestrator.cluster": 12, "orchestrator": 13,
}
MAX_LINES = 300


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in ("trainer_core", "orchestrator"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its source (``from a import b`` counts a.b when b is a
    module, else a)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def floor_of(name: str) -> int:
    while name not in FLOORS:
        name = name.rsplit(".", 1)[0]
    return FLOORS[name]


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_floor():
    assert all(floor_of(m) is not None for m in project_modules())


def test_no_upward_import():
    graph = import_graph()
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                    if floor_of(b) > floor_of(a) and not (b == "orchestrator" or b == "trainer_core"))
    assert upward == [], "imports that go up a floor:\n" + "\n".join(upward)


def test_trainer_core_never_imports_orchestrator():
    graph = import_graph()
    assert not [(a, b) for a, deps in graph.items() if a.startswith("trainer_core")
                for b in deps if b.startswith("orchestrator")]


def test_no_import_circle():
    graph = import_graph()
    # a package's __init__ re-exporting its own modules is not a circle of design: drop package -> own child edges
    graph = {a: {b for b in deps if not b.startswith(a + ".")} for a, deps in graph.items()}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The graph reader itself: a function-local import counts, and a relative one resolves."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from trainer_core.fold import loop\n    from . import build\n")
    known = {"trainer_core.fold.loop", "trainer_core.model.build", "trainer_core.model.x"}
    assert imports_of("trainer_core.model.x", src, known) == {"trainer_core.fold.loop", "trainer_core.model.build"}
    assert floor_of("trainer_core.fold.loop") > floor_of("trainer_core.model.x")


def test_modules_stay_small():
    big = {name: n for name, path in project_modules().items()
           if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert big == {}, f"modules over {MAX_LINES} lines: {big}"
