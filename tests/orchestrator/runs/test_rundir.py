"""orchestrator.runs.rundir: a directory is claimed (or emptied by --restart) only when it is empty or already a run's;
a resumed run is refused when its config or the contents of any input file changed, naming what changed. No Ray."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from orchestrator.runs.rundir import RunDirError, prepare_run_dir
from tests.conftest import CONFIGS, REPO, arena_row
from trainer_core.config import ConfigError, load_config, validate


def config(*overrides):
    return load_config(CONFIGS / "smoke.yaml", ["data.max_rows=40", *overrides])


def plant(folder):
    """Someone's work: a thesis and a code folder."""
    (folder / "code").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    (folder / "code" / "main.py").write_text("print('years of work')")


def survived(folder):
    return ((folder / "thesis.tex").read_text() == "\\documentclass{article}"
            and (folder / "code" / "main.py").exists() and not (folder / "run.json").exists())


@pytest.mark.parametrize("restart", [True, False])
def test_a_folder_that_is_not_a_run_is_never_emptied_nor_written(tmp_path, restart):
    plant(tmp_path / "thesis")
    with pytest.raises(RunDirError, match="not empty and holds no run.json of this project .*code, thesis.tex"):
        prepare_run_dir(config(), tmp_path / "thesis", [0], restart, "test")
    assert survived(tmp_path / "thesis") and sorted(p.name for p in (tmp_path / "thesis").iterdir()) == [
        "code", "thesis.tex"]


def test_restart_empties_a_run_directory_and_claims_an_empty_one(tmp_path):
    prepare_run_dir(config(), tmp_path / "run", [0], False, "test")
    (tmp_path / "run" / "fold=0").mkdir()
    (tmp_path / "run" / "fold=0" / "metrics.json").write_text("{}")
    prepare_run_dir(config("train.lr=0.5"), tmp_path / "run", [0], True, "test")
    assert not (tmp_path / "run" / "fold=0").exists() and (tmp_path / "run" / "data.parquet").exists()
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["fingerprint"] == config("train.lr=0.5").fingerprint()
    (tmp_path / "empty").mkdir()
    prepare_run_dir(config(), tmp_path / "empty", [0], True, "test")
    assert (tmp_path / "empty" / "run.json").exists()


def test_cv_and_efficiency_refuse_with_one_line_and_the_thesis_survives(tmp_path):
    plant(tmp_path / "thesis")
    for cmd in (["orchestrator.cv", "--config", CONFIGS / "smoke.yaml", "--out", tmp_path / "thesis", "--restart"],
                ["orchestrator.efficiency", "--config", CONFIGS / "smoke.yaml", "--out", tmp_path / "thesis"]):
        res = subprocess.run([sys.executable, "-m", *map(str, cmd), "data.max_rows=40"], cwd=REPO, capture_output=True,
                             text=True, timeout=180)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "holds no run.json of this project" in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert survived(tmp_path / "thesis")


def test_experiment_must_be_a_plain_name_and_every_problem_is_listed():
    for name in ("../..", "a/b", "..", "a\\b", ""):
        with pytest.raises(ConfigError) as e:
            validate(config(f"experiment={name}", "train.lr=-1"))
        assert "experiment:" in str(e.value) and "train.lr: must be > 0" in str(e.value)
    validate(config("experiment=my-run_2"))


def test_a_changed_config_is_refused_naming_the_keys_that_differ(tmp_path):
    prepare_run_dir(config(), tmp_path / "run", [0], False, "test")
    with pytest.raises(RunDirError) as e:
        prepare_run_dir(config("train.lr=0.5", "data.fold_by=prompt", "cluster.max_failures=5"), tmp_path / "run", [0],
                        False, "test")
    msg = str(e.value)
    assert "different config" in msg and "train.lr (" in msg and "-> 0.5)" in msg
    assert "data.fold_by ('id' -> 'prompt')" in msg and "cluster" not in msg and len(msg.splitlines()) == 1
    prepare_run_dir(config("cluster.max_failures=5"), tmp_path / "run", [0], False, "test")  # placement: same run


def _write(path, ids, tie=False):
    pd.DataFrame([arena_row(i, "tie" if tie else "a", prompt=[f"extra {i}"]) for i in ids]).to_csv(path, index=False)


def test_resume_checks_the_contents_of_the_extra_rows_and_soft_labels_not_their_paths(tmp_path):
    extra = tmp_path / "extra.csv"
    _write(extra, range(9001, 9011))
    cfg = config(f"data.extra_train_path={extra}")
    rows = prepare_run_dir(cfg, tmp_path / "run", [0], False, "test")
    _write(extra, range(9001, 9011), tie=True)  # same path, other labels
    with pytest.raises(RunDirError, match="different data.extra_train_path file"):
        prepare_run_dir(cfg, tmp_path / "run", [0], False, "test")

    soft = tmp_path / "soft.csv"
    table = pd.DataFrame({"id": rows["id"], "p_a": 0.5, "p_b": 0.25, "p_tie": 0.25})
    table.to_csv(soft, index=False)
    cfg = config(f"train.soft_labels={soft}")
    prepare_run_dir(cfg, tmp_path / "student", [0], False, "test")
    table.assign(p_a=0.25, p_b=0.5).to_csv(soft, index=False)
    with pytest.raises(RunDirError, match="different train.soft_labels file"):
        prepare_run_dir(cfg, tmp_path / "student", [0], False, "test")
