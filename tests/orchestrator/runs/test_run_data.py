"""orchestrator.runs.data: the one place cv and tune load, validate and split the data and write data.parquet; what
run.json and the report then say about folds and repaired text. No Ray."""

import json

import pandas as pd
import pytest

from orchestrator.reporting.markdown import folds_text
from orchestrator.runs.data import load_run_data
from orchestrator.runs.rundir import RunDirError, prepare_run_dir
from tests.conftest import CONFIGS, arena_row
from trainer_core.config import load_config


@pytest.fixture
def arena_csv(tmp_path):
    """40 rows over 8 prompts (repeated, as in arena data), one with a lone surrogate."""
    rows = [arena_row(i, ("a", "b", "tie")[i % 3], prompt=[f"prompt {i % 8}"]) for i in range(1, 41)]
    rows[4]["response_b"] = json.dumps(["broken emoji \ud83d here"])
    path = tmp_path / "arena.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def config(path, *overrides):
    return load_config(CONFIGS / "smoke.yaml", [f"data.path={path}", "data.max_rows=null", *overrides])


@pytest.mark.parametrize("fold_by", ["id", "row", "prompt"])
def test_run_json_records_the_split_and_the_repaired_rows(arena_csv, tmp_path, fold_by):
    cfg = config(arena_csv, f"data.fold_by={fold_by}")
    rows = prepare_run_dir(cfg, tmp_path / "run", [0, 1, 2, 3, 4], False,
                           "python -m orchestrator.cv --config smoke.yaml")
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["fold_by"] == fold_by and meta["text_repaired"]["count"] == 1 and meta["text_repaired"]["ids"] == [5]
    saved = pd.read_parquet(tmp_path / "run" / "data.parquet")
    assert saved["fold"].tolist() == rows["fold"].tolist() and sorted(set(saved["fold"])) == [0, 1, 2, 3, 4]
    crossing = (saved.groupby("prompt")["fold"].nunique() > 1).any()
    assert crossing == (fold_by != "prompt")  # with 8 prompts over 5 folds, id and row splits put some on both sides


def test_a_run_directory_split_another_way_is_refused(arena_csv, tmp_path):
    prepare_run_dir(config(arena_csv), tmp_path / "run", [0], False, "test")
    with pytest.raises(RunDirError, match="different config"):
        prepare_run_dir(config(arena_csv, "data.fold_by=prompt"), tmp_path / "run", [0], False, "test")


def test_tune_and_cv_share_the_loader(arena_csv):
    data = load_run_data(config(arena_csv, "data.fold_by=row"))
    assert data.notes["fold_by"] == "row" and data.rows["fold"].tolist() == [i % 5 for i in range(40)]
    assert len(data.sha256) == 64


def test_the_report_says_when_a_split_is_optimistic():
    for fold_by in ("id", "row"):
        assert f"data.fold_by={fold_by}" in folds_text({"fold_by": fold_by}) and "optimistic" in folds_text(
            {"fold_by": fold_by})
    assert "optimistic" not in folds_text({"fold_by": "prompt"}) and "grouped by prompt" in folds_text(
        {"fold_by": "prompt"})
    assert "data.fold_by=id" in folds_text({})  # runs from before the key
