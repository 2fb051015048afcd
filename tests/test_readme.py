"""The README's layout tree names every folder of both packages, with a phrase, and no folder that does not exist."""

import re

from tests.conftest import REPO


def layout_tree() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    layout = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    tree = layout.split("```\n", 1)[1].split("```", 1)[0]
    entries, parent = {}, ""
    for line in tree.splitlines():
        m = re.match(r"( *)(\S+/)\s+(.+)", line)
        assert m, f"layout line without a folder and a phrase: {line!r}"
        indent, name, phrase = m.groups()
        path = name if not indent else parent + name
        parent = name if not indent else parent
        entries[path.rstrip("/")] = phrase.strip()
    return entries


def test_layout_tree_names_every_package_folder():
    listed = layout_tree()
    folders = {str(p.parent.relative_to(REPO)) for pkg in ("trainer_core", "orchestrator")
               for p in (REPO / pkg).rglob("__init__.py")}
    assert folders <= set(listed), f"folders missing from the README layout: {sorted(folders - set(listed))}"
    assert all(len(phrase.split()) >= 3 for phrase in listed.values())


def test_layout_tree_names_only_folders_that_exist():
    missing = [p for p in layout_tree() if not (REPO / p).is_dir()]
    assert missing == [], f"README layout names folders that do not exist: {missing}"
