"""docs/INTERNAL_APIS.md is the one list of private torch/transformers/peft/bitsandbytes APIs the project uses: each
listed use sits in its owner module only, no unlisted one exists, every row is still used and names a real test.

A "use" is a fully qualified name found by parsing the source (imports resolved through the module's own aliases,
attribute chains, getattr/hasattr/setattr names); comments, docstrings and message text never count."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

DOC = "docs/INTERNAL_APIS.md"
SCANNED = ("orchestrator", "trainer_core", "scripts")
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")
OURS = ("orchestrator", "trainer_core", "tests", "scripts")
# What counts as internal: underscore names inside the libraries; transformers modules whose public names come from
# `transformers` itself; peft's internals; attributes of library objects with no public accessor.
INTERNAL = [re.compile(p) for p in (
    r"^(torch|transformers|peft|bitsandbytes)(\.\w+)*\._(?!_)",
    r"^transformers\.(models|masking_utils|integrations|utils)\.",
    r"^peft\.(tuners|utils)\.",
    r"\.quant_state$", r"\.lora_dropout$", r"\.(pre|post)_feedforward_layernorm$", r"\.attn_logit_softcapping$",
)]
ATTR_CALLS = {"getattr", "hasattr", "setattr", "delattr"}


@dataclass(frozen=True)
class Row:
    api: str
    patterns: tuple[re.Pattern, ...]
    owner: str
    tests: tuple[str, ...]


@dataclass(frozen=True)
class Use:
    name: str
    path: str  # relative to the scanned root
    line: int


def _cells(line: str) -> list[str]:
    """A markdown table row's cells; ``\\|`` is a pipe inside a cell (a regex alternation)."""
    parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [p.strip().replace("\\|", "|") for p in parts]


def read_table(text: str) -> list[Row]:
    table = ("\n" + text).split("\n## Table\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    header = _cells(lines[0])
    col = {name: header.index(name) for name in ("API", "Pattern", "Owner", "Test")}
    rows = []
    for line in lines[2:]:
        cells = _cells(line)
        ticks = {k: re.findall(r"`([^`]+)`", cells[i]) for k, i in col.items()}
        api = cells[col["API"]]
        label = api.split(":")[0] if ":" in api.split("`")[0] else (re.findall(r"`([^`]+)`", api) or [api])[0]
        rows.append(Row(api=label.strip(),
                        patterns=tuple(re.compile(p) for p in ticks["Pattern"]),
                        owner=ticks["Owner"][0] if ticks["Owner"] else "", tests=tuple(ticks["Test"])))
    return rows


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    """``a.b.c`` with ``a`` resolved through the module's imports; ``?`` for a root that is not a name."""
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value, aliases)}.{node.attr}"
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    return "?"


def uses_in(source: str, path: str) -> list[Use]:
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    found: list[Use] = []
    for node in ast.walk(tree):  # aliases first: an import inside a function still names a library
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                found.append(Use(a.name, path, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                found.append(Use(f"{node.module}.{a.name}", path, node.lineno))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.append(Use(_dotted(node, aliases), path, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ATTR_CALLS
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            found.append(Use(f"{_dotted(node.args[0], aliases)}.{node.args[1].value}", path, node.lineno))
    return list(dict.fromkeys(u for u in found if u.name.split(".")[0] not in OURS))  # once per name and line


def scan(root: Path, folders: tuple[str, ...] = SCANNED) -> list[Use]:
    return [u for folder in folders for f in sorted((root / folder).rglob("*.py"))
            for u in uses_in(f.read_text(), str(f.relative_to(root)))]


def _per_line(uses: list[Use]) -> list[Use]:
    """One use a line for messages, the longest name (``torch._dynamo.config.x`` rather than ``torch._dynamo``)."""
    best: dict[tuple[str, int], Use] = {}
    for u in uses:
        if len(u.name) > len(best.get((u.path, u.line), Use("", "", 0)).name):
            best[(u.path, u.line)] = u
    return list(best.values())


def problems(rows: list[Row], uses: list[Use], root: Path) -> list[str]:
    """Every way the code and the table disagree, each with what to change."""
    out = []
    for row in rows:
        for test in row.tests:
            file, _, name = test.partition("::")
            if not (root / file).is_file() or not re.search(rf"^def {re.escape(name)}\(", (root / file).read_text(),
                                                           re.M):
                out.append(f"{DOC}: row {row.api!r} names test {test}, which does not exist")
        mine = [u for u in uses if any(p.search(u.name) for p in row.patterns)]
        where = sorted({u.path for u in mine})
        if not row.patterns or not row.owner:
            out.append(f"{DOC}: row {row.api!r} needs a Pattern and an Owner cell")
            continue
        if not mine:
            out.append(f"{DOC}: row {row.api!r}: nothing in {', '.join(SCANNED)} uses it any more: delete the row "
                       "(or fix its Pattern)")
            continue
        stray = [u for u in mine if u.path != row.owner]
        if stray and row.owner not in where:
            out.append(f"{DOC}: row {row.api!r}: owner {row.owner} no longer uses it; it is used in "
                       f"{', '.join(where)}. If the code moved, set that row's Owner cell to `{where[0]}`"
                       + (" and bring the other uses into it" if len(where) > 1 else ""))
        else:
            out.extend(f"{u.path}:{u.line}: {u.name} is listed in {DOC} (row {row.api!r}) with owner {row.owner}: "
                       f"move this use into {row.owner}, or, if this module now owns it, set that row's Owner cell to "
                       f"`{u.path}` and move the other uses here" for u in _per_line(stray))
    listed = [p for row in rows for p in row.patterns]
    unlisted = [u for u in uses
                if any(p.search(u.name) for p in INTERNAL) and not any(p.search(u.name) for p in listed)]
    out.extend(f"{u.path}:{u.line}: {u.name} is an internal API not listed in {DOC}: use a public API, or add a row "
               "(API, Pattern, why no public API serves, Owner, versions checked, Test)" for u in _per_line(unlisted))
    return out


def test_internal_apis_are_listed_and_used_only_by_their_owner():
    rows = read_table((REPO / DOC).read_text())
    assert len(rows) >= 5 and all(r.tests for r in rows)
    found = problems(rows, scan(REPO), REPO)
    assert found == [], "\n".join(found)


def test_a_listed_api_outside_its_owner_an_unlisted_one_and_a_stale_row_fail(tmp_path):
    """The checker on a small tree: one owner, one stray use, one unlisted internal, one row nobody uses."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def test_x():\n    pass\n")
    (tmp_path / "pkg" / "owner.py").write_text("import torch._dynamo\n\ntorch._dynamo.config.cache_size_limit = 64\n")
    (tmp_path / "pkg" / "other.py").write_text(
        "import torch\nfrom torch._inductor.virtualized import V as handlers\n\n\ndef f(m):\n"
        "    '''torch._dynamo in a docstring does not count'''\n"
        "    torch._dynamo.reset()\n    handlers.set_choices_handler(None)\n    return getattr(m, 'quant_state')\n")
    doc = ("## Table\n| API | Pattern | Owner | Test |\n|---|---|---|---|\n"
           "| dynamo | `^torch\\._dynamo\\b` | `pkg/owner.py` | `tests/test_x.py::test_x` |\n"
           "| gone | `\\.lora_dropout$` | `pkg/owner.py` | `tests/test_x.py::test_missing` |\n")
    found = problems(read_table(doc), scan(tmp_path, ("pkg",)), tmp_path)
    text = "\n".join(found)
    assert "pkg/other.py:7: torch._dynamo.reset is listed" in text
    assert "move this use into pkg/owner.py, or, if this module now owns it, set that row's Owner cell to " in text
    assert "pkg/other.py:8: torch._inductor.virtualized.V.set_choices_handler is an internal API not listed" in text
    assert "pkg/other.py:9: m.quant_state is an internal API not listed" in text
    assert "row 'gone': nothing in" in text and "names test tests/test_x.py::test_missing" in text
    assert "pkg/other.py:6" not in text and not re.search("^pkg/owner.py", text, re.M)  # a docstring; the owner
    assert len(found) == 6, text  # the import on line 2 is a use too

    # the whole use moved (the fast-path move): the message names the new owner
    (tmp_path / "pkg" / "owner.py").write_text("x = 1\n")
    moved = problems(read_table(doc)[:1], [u for u in scan(tmp_path, ("pkg",)) if "_dynamo" in u.name], tmp_path)
    assert moved == [f"{DOC}: row 'dynamo': owner pkg/owner.py no longer uses it; it is used in pkg/other.py. If the "
                     "code moved, set that row's Owner cell to `pkg/other.py`"]
