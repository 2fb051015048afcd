"""scripts/make_synthetic_arena.py writes an arena-shaped file with the real file's oddities, and the data path takes
all of them: lone surrogates repaired and counted, nulls, repeated prompts kept in one fold by data.fold_by=prompt."""

import subprocess
import sys

from tests.conftest import REPO
from trainer_core.data.arena import assign_folds, load_dataset

SCRIPT = REPO / "scripts" / "make_synthetic_arena.py"


def test_a_small_file_has_the_oddities_and_loads(tmp_path):
    out = tmp_path / "arena.csv"
    res = subprocess.run([sys.executable, SCRIPT, "--out", out, "--rows", "400", "--surrogates", "6", "--huge", "1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    raw = out.read_bytes()
    assert b"\\ud83d here" in raw and b"[null]" in raw
    data = load_dataset(out)
    rows = data.rows
    assert len(rows) == 400 and rows["id"].is_unique and len(data.repaired_ids) == 6
    assert rows["response_a"].str.len().max() == len("word " * 200_000)  # the huge row, kept whole
    assert rows["prompt"].duplicated().sum() >= 10 and set(rows["label"]) == {0, 1, 2}
    folds = assign_folds(rows, 5, by="prompt")
    assert (folds.groupby("prompt")["fold"].nunique() == 1).all()
