"""One supported version range per library: pyproject's dependencies, the README's "Supported versions" table and the
torch that .ci/run installs agree, and the tested versions lie inside the ranges."""

import re

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.conftest import REPO


def pyproject_dependencies() -> dict[str, SpecifierSet]:
    block = (REPO / "pyproject.toml").read_text().split("\ndependencies = [", 1)[1].split("\n]", 1)[0]
    return {r.name: r.specifier for r in map(Requirement, re.findall(r'^\s*"([^"]+)"', block, re.M))}


def readme_table() -> dict[str, tuple[SpecifierSet, list[str]]]:
    """package -> (supported range, tested versions) from the README's table."""
    text = (REPO / "README.md").read_text().split("### Supported versions\n", 1)[1].split("\n#", 1)[0]
    rows = [ln.strip("|").split("|") for ln in text.splitlines() if ln.startswith("| ") and "`" in ln]
    return {cells[0].strip(): (SpecifierSet(cells[1].strip(" `")), [c.split()[0] for c in cells[2:]]) for cells in rows}


def test_pyproject_readme_and_ci_state_one_range():
    deps, table = pyproject_dependencies(), readme_table()
    assert set(table) == {"torch", "transformers", "peft", "bitsandbytes"}
    for name, (supported, tested) in table.items():
        assert deps[name] == supported, f"{name}: pyproject says {deps[name]}, the README {supported}"
        for version in tested:
            assert Version(version) in supported, f"{name} {version} was tested but lies outside {supported}"
        assert Version("99") not in supported, f"{name}: {supported} reaches past the newest release tested"
    ci_torch = re.search(r"torch==([\w.+]+)", (REPO / ".ci" / "run").read_text()).group(1)
    assert ci_torch == table["torch"][1][0].removesuffix("+cpu"), "README's CPU CI torch is not what .ci/run installs"
    quick_start = re.search(r"pip install torch==([\w.]+) -e", (REPO / "README.md").read_text()).group(1)
    assert quick_start == ci_torch


def test_the_exported_predictor_asks_for_the_projects_ranges():
    from orchestrator.export import PREDICTOR_REQUIREMENTS

    deps, wanted = pyproject_dependencies(), [Requirement(r) for r in PREDICTOR_REQUIREMENTS]
    assert [r.name for r in wanted] == ["torch", "transformers", "peft", "bitsandbytes", "pandas"]
    for r in wanted:
        assert r.specifier == deps[r.name], f"{r.name}: the export asks for {r.specifier}, pyproject {deps[r.name]}"
