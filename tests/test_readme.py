"""The README's layout section lists every module of both packages exactly once."""

import re

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("package", ["trainer_core", "orchestrator"])
def test_layout_lists_every_module_once(package):
    text = (REPO / "README.md").read_text()
    layout = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    bullet = next(b for b in layout.split("\n- ") if b.lstrip("- ").startswith(f"`{package}/`"))
    listed = re.findall(r"`([a-z_0-9]+\.py)`", bullet)
    modules = sorted(p.name for p in (REPO / package).glob("*.py") if p.name != "__init__.py")
    assert sorted(set(listed)) == modules, f"README layout of {package}/ differs from its modules"
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({m for m in listed if listed.count(m) > 1})}"
