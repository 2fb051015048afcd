"""A run directory written by the code before the reorganisation (commit f6d7332, tests/fixtures/run_f6d7332/README.md
says how it was made) still reports, is still claimed as the same run, and resumes: finished folds are skipped, a new
fold trains. Any change to the run-directory files or to the config fingerprint breaks these tests; such a change
needs a migration (or a note in the README that old run directories must be rerun), not a new fixture."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import report
from orchestrator.reporting.reducer import fold_is_complete
from orchestrator.runs.data import file_sha256
from orchestrator.runs.rundir import prepare_run_dir
from tests.conftest import REPO
from trainer_core.config import load_config

FIXTURE = REPO / "tests" / "fixtures" / "run_f6d7332"
# The fingerprint hashes data.path as given (absolute), so the rows must sit where they sat when the fixture was made:
# any other path is "a different config" by design. /tmp, not tmp_path, for that reason.
ROWS_AT = Path("/tmp/gemma2-cv-old-run/rows.csv")
RESUME_FOLDS = "0-2"


@pytest.fixture
def old_run(tmp_path) -> Path:
    """A copy of the old run directory (tests never write into the fixture), its rows placed where they were."""
    if not ROWS_AT.exists() or ROWS_AT.read_bytes() != (FIXTURE / "rows.csv").read_bytes():
        ROWS_AT.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=ROWS_AT.parent)  # atomic: two test sessions may place it at once
        os.close(fd)
        shutil.copyfile(FIXTURE / "rows.csv", tmp)
        os.replace(tmp, ROWS_AT)
    copy = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", copy)
    return copy


def old_report() -> dict:
    return json.loads((FIXTURE / "run" / "report.json").read_text())


def config_args() -> list[str]:
    """The fixture's command line, less --folds and --out (README.md in the fixture)."""
    return ["--config", str(FIXTURE / "smoke.yaml"), f"data.path={ROWS_AT}"]


def test_report_rebuilds_the_old_run_with_the_same_figures(old_run, capsys):
    (old_run / "report.json").unlink()
    assert report.main([str(old_run)]) == 0
    new, old = json.loads((old_run / "report.json").read_text()), old_report()
    assert new["cv_log_loss"] == pytest.approx(old["cv_log_loss"], rel=1e-12)
    assert new["cv_accuracy"] == old["cv_accuracy"] and new["n_rows"] == old["n_rows"] == 14
    assert [(f["fold"], f["n_rows"]) for f in new["folds"]] == [(f["fold"], f["n_rows"]) for f in old["folds"]]
    assert [f["log_loss"] for f in new["folds"]] == pytest.approx([f["log_loss"] for f in old["folds"]], rel=1e-12)
    assert new["fingerprint"] == json.loads((old_run / "run.json").read_text())["fingerprint"]
    assert (old_run / "report.html").stat().st_size > 0 and list((old_run / "report_plots").glob("*.png"))
    assert f"{old['cv_log_loss']:.4f}" in capsys.readouterr().out


def test_the_same_config_claims_the_old_run_and_sees_its_finished_folds(old_run):
    """What cv decides before Ray starts, without Ray: the same command's config and data are this run's (the
    fingerprint and data hash recorded by the old code match), folds 0 and 1 are complete and fold 2 is not."""
    meta = json.loads((old_run / "run.json").read_text())
    cfg = load_config(FIXTURE / "smoke.yaml", [f"data.path={ROWS_AT}"])
    assert cfg.fingerprint() == meta["fingerprint"]
    assert file_sha256(ROWS_AT) == meta["data_sha256"]
    rows = prepare_run_dir(cfg, old_run, [0, 1, 2], False, "python -m orchestrator.cv (test)")  # raises if refused
    assert [fold_is_complete(old_run, k, rows) for k in (0, 1, 2)] == [True, True, False]


@pytest.mark.slow  # starts Ray and trains one fold: about a minute on 2 cores
def test_resuming_the_old_run_skips_its_folds_and_trains_a_new_one(old_run):
    stamps = {k: (old_run / f"fold={k}" / "metrics.json").stat().st_mtime_ns for k in (0, 1)}
    res = subprocess.run([sys.executable, "-m", "orchestrator.cv", *config_args(), "--folds", RESUME_FOLDS,
                          "--out", str(old_run)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "folds [0, 1] already finished" in res.stdout and "training folds [2]" in res.stdout
    assert {k: (old_run / f"fold={k}" / "metrics.json").stat().st_mtime_ns for k in (0, 1)} == stamps
    new, old = json.loads((old_run / "report.json").read_text()), old_report()
    assert [f["fold"] for f in new["folds"]] == [0, 1, 2]
    fold2 = pd.read_csv(ROWS_AT).query("id % 5 == 2")
    assert new["n_rows"] == old["n_rows"] + len(fold2)
    assert sorted(pd.read_parquet(old_run / "fold=2" / "oof.parquet")["id"]) == sorted(fold2["id"])
    assert [f["log_loss"] for f in new["folds"][:2]] == pytest.approx([f["log_loss"] for f in old["folds"]],
                                                                      rel=1e-12)
