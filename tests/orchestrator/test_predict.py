"""orchestrator.predict on a real smoke run: fold models reload exactly, the submission is valid for unseen rows,
TTA is symmetric on a real model, soft labels match the report, and bad input writes nothing.

The run directory is built once for the module, in this process (tests/orchestrator/smoke_run.py)."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from orchestrator.predict import predict_submission
from orchestrator.reporting.calibration import apply_temperature, calibrate_by_fold
from orchestrator.reporting.reducer import reduce_run
from orchestrator.runs.rundir import prepare_run_dir
from tests.conftest import CONFIGS, DATA, REPO
from tests.orchestrator.smoke_run import N_ROWS, build_smoke_run, smoke_config
from trainer_core.config import load_config, to_yaml
from trainer_core.data.arena import load_rows
from trainer_core.data.tta import swap_probs, swap_responses
from trainer_core.fold.loop import train_fold

# a smoke run trained fold by fold (in this process), then predict's command line on it: about 1.5 CPU-minutes
pytestmark = pytest.mark.slow
SUB_COLUMNS = ["id", "winner_model_a", "winner_model_b", "winner_tie"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_smoke_run(tmp_path_factory.mktemp("predict") / "run")


def predict(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "orchestrator.predict", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def raw_rows(start, stop, labels=True):
    df = pd.read_csv(DATA).iloc[start:stop]
    return df if labels else df.drop(columns=["winner_model_a", "winner_model_b", "winner_tie"])


def test_fold_model_reloads_exactly_and_gets_the_fitted_temperature(run_dir, tmp_path):
    # Predicting fold 1's own held-out rows with fold 1's model alone must reproduce its OOF probabilities, with
    # the run's global temperature applied on top.
    report = json.loads((run_dir / "report.json").read_text())
    held = raw_rows(0, N_ROWS)
    held = held[held["id"] % 5 == 1]
    held.to_csv(tmp_path / "fold1.csv", index=False)
    res = predict("--run", run_dir, "--data", tmp_path / "fold1.csv", "--out", tmp_path / "sub.csv", "--folds", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    sub = pd.read_csv(tmp_path / "sub.csv")
    oof = pd.read_parquet(run_dir / "fold=1" / "oof.parquet").set_index("id").loc[sub["id"]]
    expected = apply_temperature(oof[["p_a", "p_b", "p_tie"]].to_numpy(), report["temperature"])
    assert np.allclose(sub[SUB_COLUMNS[1:]].to_numpy(), expected, atol=1e-5)
    assert f"temperature {report['temperature']:.3f}" in res.stdout


def test_submission_for_unseen_rows_with_tta_and_soft_labels(run_dir, tmp_path):
    unseen = raw_rows(N_ROWS, N_ROWS + 25, labels=False)  # never trained or scored, no label columns (as Kaggle's)
    unseen.iloc[3, unseen.columns.get_loc("response_b")] = json.dumps(["broken emoji \ud83d here"])  # a lone surrogate
    unseen.to_csv(tmp_path / "test.csv", index=False)
    res = predict("--run", run_dir, "--data", tmp_path / "test.csv", "--out", tmp_path / "submission.csv", "--tta",
                  "--soft-labels", tmp_path / "soft.parquet")
    assert res.returncode == 0, res.stderr[-3000:]
    sub = pd.read_csv(tmp_path / "submission.csv")
    assert list(sub.columns) == SUB_COLUMNS and list(sub["id"]) == list(unseen["id"])
    assert res.stderr.count("UTF-8 cannot encode") == 1 and f"id {unseen['id'].iloc[3]}" in res.stderr
    p = sub[SUB_COLUMNS[1:]].to_numpy()
    assert np.isfinite(p).all() and (p > 0).all() and (p < 1).all() and np.allclose(p.sum(1), 1.0)
    assert "temperature_tta" in res.stdout and all(f"fold {k}: scored 25 rows (+ swapped)" in res.stdout
                                                     for k in range(5))

    report = json.loads((run_dir / "report.json").read_text())
    soft = pd.read_parquet(tmp_path / "soft.parquet")
    oof = pd.read_parquet(run_dir / "oof.parquet")
    assert list(soft.columns) == ["id", "fold", "label", "p_a", "p_b", "p_tie", "p_a_tta", "p_b_tta", "p_tie_tta",
                                  "p_a_cal", "p_b_cal", "p_tie_cal", "temperature", "p_a_tta_cal", "p_b_tta_cal",
                                  "p_tie_tta_cal", "temperature_tta"]
    assert soft["id"].tolist() == oof["id"].tolist() and len(soft) == N_ROWS
    cal = calibrate_by_fold(oof[["p_a", "p_b", "p_tie"]].to_numpy(), oof["fold"].to_numpy(),
                            report["temperatures_by_fold"])
    assert np.allclose(soft[["p_a_cal", "p_b_cal", "p_tie_cal"]].to_numpy(), cal)
    from trainer_core.metrics import log_loss
    assert log_loss(soft["label"], cal) == pytest.approx(report["cv_log_loss_calibrated"])


def test_tta_is_symmetric_on_a_real_fold_model(run_dir):
    rows = load_rows(DATA, max_rows=N_ROWS + 10).iloc[N_ROWS:]
    kw = dict(tta=True, temperature=1.0, device="cpu", log=lambda *_: None)
    p = predict_submission(run_dir, rows, [0], **kw)
    p_swapped = predict_submission(run_dir, swap_responses(rows), [0], **kw)
    assert np.allclose(p_swapped, swap_probs(p), atol=1e-6)


def test_report_has_tta_beside_the_plain_figure(run_dir):
    from sklearn.metrics import log_loss as sk_log_loss

    report = json.loads((run_dir / "report.json").read_text())
    oof = pd.read_parquet(run_dir / "oof.parquet")
    assert report["cv_log_loss"] == pytest.approx(sk_log_loss(oof["label"], oof[["p_a", "p_b", "p_tie"]],
                                                              labels=[0, 1, 2]), abs=1e-12)
    assert report["cv_log_loss_tta"] == pytest.approx(sk_log_loss(oof["label"], oof[["p_a_tta", "p_b_tta",
                                                                                     "p_tie_tta"]], labels=[0, 1, 2]))
    metrics = json.loads((run_dir / "fold=2" / "metrics.json").read_text())
    assert metrics["log_loss_tta"] == pytest.approx(report["folds"][2]["log_loss_tta"])


def test_bad_input_is_one_clear_line_and_writes_nothing(run_dir, tmp_path):
    bad = raw_rows(N_ROWS, N_ROWS + 5, labels=False).drop(columns=["response_b"])
    bad.to_csv(tmp_path / "bad.csv", index=False)
    res = predict("--run", run_dir, "--data", tmp_path / "bad.csv", "--out", tmp_path / "sub.csv",
                  "--soft-labels", tmp_path / "soft.parquet", timeout=120)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "bad.csv" in err[0] and "response_b" in err[0]
    assert not (tmp_path / "sub.csv").exists() and not (tmp_path / "soft.parquet").exists()
    res = predict("--run", tmp_path, "--data", tmp_path / "bad.csv", "--out", tmp_path / "sub.csv", timeout=120)
    assert res.returncode == 2 and "not a run directory" in res.stderr


def test_ensemble_predicts_with_each_members_fold_models_then_the_weights(run_dir, tmp_path):
    # Member B: a copy of the run whose fold 1 is retrained with another seed and learning rate, so the two members'
    # fold-1 models differ; the ensemble is then scored on unseen rows with fold 1 only.
    import shutil

    from orchestrator.ensemble import main as ensemble_main
    from orchestrator.predict import fold_predictions
    from orchestrator.runs.ensemble_weights import combine

    tree = tmp_path / "tree"
    member_a, member_b = tree / "a", tree / "b"
    shutil.copytree(run_dir, member_a, ignore=shutil.ignore_patterns("ray", "logs", "tensorboard"))
    shutil.copytree(run_dir, member_b, ignore=shutil.ignore_patterns("ray", "logs", "tensorboard"))
    shutil.rmtree(member_b / "fold=1")
    cfg = load_config(member_b / "config.yaml", ["train.seed=7", "train.lr=5e-3"])
    (member_b / "config.yaml").write_text(to_yaml(cfg))
    train_fold(cfg, 1, pd.read_parquet(member_b / "data.parquet"), member_b / "fold=1")
    reduce_run(member_b, [0, 1, 2, 3, 4])
    assert ensemble_main([str(member_a), str(member_b), "--out", str(tree / "ens"), "--method", "logit"]) == 0
    moved = tmp_path / "moved"  # the whole tree copied elsewhere, the original gone: ensemble.json paths are relative
    shutil.move(tree, moved)
    member_b = moved / "b"
    unseen = raw_rows(N_ROWS, N_ROWS + 12, labels=False)
    unseen.to_csv(tmp_path / "test.csv", index=False)
    res = predict("--run", moved / "ens", "--data", tmp_path / "test.csv", "--out", tmp_path / "sub.csv",
                  "--folds", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    sub = pd.read_csv(tmp_path / "sub.csv")
    ens = json.loads((moved / "ens" / "ensemble.json").read_text())
    report = json.loads((moved / "ens" / "report.json").read_text())
    rows = load_rows(tmp_path / "test.csv", require_labels=False)
    quiet = dict(tta=False, device="cpu", log=lambda *_: None)
    (_, p_a), (_, p_b) = (next(fold_predictions(d, rows, [1], **quiet)) for d in (run_dir, member_b))
    assert not np.allclose(p_a, p_b, atol=1e-3)  # the members really differ
    expected = apply_temperature(combine([p_a, p_b], ens["weights"], "logit"), report["temperature"])
    assert np.allclose(sub[SUB_COLUMNS[1:]].to_numpy(), expected, atol=1e-5)


def test_an_ensemble_with_the_length_baseline_predicts_with_fold_ks_regression(run_dir, tmp_path):
    from orchestrator.ensemble import main as ensemble_main
    from orchestrator.predict import fold_predictions
    from orchestrator.reporting.baselines import fit_predict
    from orchestrator.runs.ensemble_weights import combine

    assert ensemble_main([str(run_dir), "--with-length-baseline", "--out", str(tmp_path / "ens")]) == 0
    rows = load_rows(_write(raw_rows(N_ROWS, N_ROWS + 12, labels=False), tmp_path / "test.csv"),
                     require_labels=False)
    ens = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    quiet = dict(tta=False, device="cpu", log=lambda *_: None)
    (_, got), = fold_predictions(tmp_path / "ens", rows, [1], **quiet)
    (_, p_run), = fold_predictions(run_dir, rows, [1], **quiet)
    data = pd.read_parquet(run_dir / "data.parquet")
    p_length = fit_predict(data[data["fold"] != 1], rows)  # fold 1's regression: the other folds' rows
    assert np.allclose(got, combine([p_run, p_length], ens["weights"], ens["method"]), atol=1e-12)


def _write(df, path):
    df.to_csv(path, index=False)
    return path


def test_in_fold_soft_labels_are_each_fold_models_predictions_on_its_own_training_rows(run_dir, tmp_path):
    from trainer_core.data.soft_labels import IN_FOLD, check_soft_labels, folds_sha256, read_provenance

    res = predict("--run", run_dir, "--soft-labels", tmp_path / "in_fold.parquet", "--in-fold", "--folds", "0,2")
    assert res.returncode == 0, res.stderr[-3000:]
    soft = pd.read_parquet(tmp_path / "in_fold.parquet")
    rows = pd.read_parquet(run_dir / "data.parquet")
    assert list(soft.columns) == ["id", "fold", "label", "p_a", "p_b", "p_tie"]
    for k in (0, 2):
        part = soft[soft["fold"] == k]
        train = rows[rows["fold"] != k].sort_values("id")
        assert part["id"].tolist() == train["id"].tolist()  # fold k's training rows, none of its held-out rows
        expected = predict_submission(run_dir, train, [k], tta=False, temperature=1.0, device="cpu",
                                      log=lambda *_: None)
        assert np.allclose(part[["p_a", "p_b", "p_tie"]].to_numpy(), expected, atol=1e-6)
    # the file says where it came from: what a student checks and inherits
    prov = read_provenance(tmp_path / "in_fold.parquet")
    meta = json.loads((run_dir / "run.json").read_text())
    assert prov == {"teacher_run": str(run_dir.resolve()), "kind": "in_fold", "data_sha256": meta["data_sha256"],
                    "fold_by": "id", "n_folds": 5, "folds_sha256": folds_sha256(rows),
                    "teacher_optimistic_because": []}
    # a student with the same folds accepts them for folds 0 and 2, and refuses fold 1 (no rows for it) in one line
    assert check_soft_labels(tmp_path / "in_fold.parquet", rows, [0, 2], 5) == IN_FOLD
    res = subprocess.run([sys.executable, "-m", "orchestrator.cv", "--config", "configs/smoke.yaml", "--folds", "0-1",
                          f"data.max_rows={N_ROWS}", f"train.soft_labels={tmp_path / 'in_fold.parquet'}",
                          "--out", str(tmp_path / "student")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no soft label for fold 1's training ids" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "student").exists()


def test_a_lost_adapter_file_or_an_unfinished_fold_is_one_line_with_the_way_out(run_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("ray", "logs", "tensorboard"))
    raw_rows(N_ROWS, N_ROWS + 5, labels=False).to_csv(tmp_path / "t.csv", index=False)
    lost = broken / "fold=2" / "adapter" / "adapter_model.safetensors"
    lost.unlink()
    res = predict("--run", broken, "--data", tmp_path / "t.csv", "--out", tmp_path / "sub.csv", timeout=120)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and str(lost) in err[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "sub.csv").exists()
    (broken / "fold=3" / "metrics.json").unlink()
    res = predict("--run", broken, "--data", tmp_path / "t.csv", "--out", tmp_path / "sub.csv", "--no-temperature",
                  timeout=120)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and "[3] not finished" in err[0]
    assert "python -m orchestrator.cv --config configs/smoke.yaml" in err[0] and "--folds 0,1,2,4" in err[0]


def _student(tmp_path, soft, *overrides):
    cfg = smoke_config(f"train.soft_labels={soft}", *overrides)
    return cfg, prepare_run_dir(cfg, tmp_path / "student", [0], False, "test")


def test_optimism_passes_down_a_distillation_chain_and_other_folds_are_refused(run_dir, tmp_path):
    import shutil

    from orchestrator.reporting.reducer import format_table
    from trainer_core.data.arena import DataError

    # A teacher that itself learned from plain OOF soft labels (its run.json says so, as cv writes it)
    teacher = tmp_path / "teacher"
    shutil.copytree(run_dir, teacher, ignore=shutil.ignore_patterns("ray", "logs", "tensorboard"))
    meta = json.loads((teacher / "run.json").read_text())
    meta["soft_labels"] = {"path": "grand_oof.parquet", "kind": "oof", "sha256": "0", "distill_weight": 0.5}
    (teacher / "run.json").write_text(json.dumps(meta))
    res = predict("--run", teacher, "--soft-labels", tmp_path / "in_fold.parquet", "--in-fold", "--folds", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    # its in-fold labels are not honest: fold 0's teacher model had seen fold 0's labels at one remove
    cfg, rows = _student(tmp_path, tmp_path / "in_fold.parquet")
    soft = json.loads((tmp_path / "student" / "run.json").read_text())["soft_labels"]
    assert soft["kind"] == "in_fold" and soft["provenance"]["teacher_optimistic_because"]
    train_fold(cfg, 0, rows, tmp_path / "student" / "fold=0")
    rep = reduce_run(tmp_path / "student", [0])
    assert rep["distillation"]["optimistic"] and rep["optimistic_because"]
    for text in (format_table(rep), (tmp_path / "student" / "report.md").read_text()):
        assert "whose own CV is optimistic" in text and "stays honest" not in text
    # the same file for a student on other rows or other folds: refused before anything is written
    for overrides, words in ((["data.fold_by=prompt"], "other folds"), ([f"data.max_rows={N_ROWS + 10}"],
                                                                          "split into other folds")):
        with pytest.raises(DataError, match=words):
            cfg = load_config(CONFIGS / "smoke.yaml", [f"data.max_rows={N_ROWS}", f"train.soft_labels="
                                                       f"{tmp_path / 'in_fold.parquet'}", *overrides])
            prepare_run_dir(cfg, tmp_path / "other", [0], False, "test")
        assert not (tmp_path / "other").exists()
    other_data = tmp_path / "other.csv"
    raw_rows(0, N_ROWS).to_csv(other_data, index=False, lineterminator="\r\n")  # same rows, other bytes
    with pytest.raises(DataError, match="another data file"):
        cfg = load_config(CONFIGS / "smoke.yaml", [f"data.max_rows={N_ROWS}", f"data.path={other_data}",
                                                   f"train.soft_labels={tmp_path / 'in_fold.parquet'}"])
        prepare_run_dir(cfg, tmp_path / "other", [0], False, "test")


def test_folds_spread_over_several_devices_give_the_same_submission(run_dir, tmp_path, capsys):
    """--device with several devices (every GPU by default; here two CPU processes) scores the folds on them at
    once, round robin, and averages them as one device does: the same numbers."""
    from orchestrator.runs.scoring import spread_folds

    assert spread_folds([0, 1, 2, 3, 4], ["cuda:0", "cuda:1"]) == [("cuda:0", [0, 2, 4]), ("cuda:1", [1, 3])]
    assert spread_folds([3], ["cuda:0", "cuda:1"]) == [("cuda:0", [3])]
    raw_rows(N_ROWS, N_ROWS + 12, labels=False).to_csv(tmp_path / "test.csv", index=False)
    rows = load_rows(tmp_path / "test.csv", require_labels=False)
    one = predict_submission(run_dir, rows, [0, 1, 2, 3, 4], tta=True, temperature=1.3, device="cpu")
    two = predict_submission(run_dir, rows, [0, 1, 2, 3, 4], tta=True, temperature=1.3, device="cpu,cpu")
    assert "scoring folds on 2 devices at once: cpu: folds [0, 2, 4]; cpu: folds [1, 3]" in capsys.readouterr().out
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-7)


def test_fp8_prediction_is_an_override_that_says_so_and_stays_close(run_dir):
    """``model.fp8_predict=true`` on a finished run (its nf4 weights cached in fp8): the progress line says fp8, the
    probabilities move a little and stay probabilities; the run's own files are untouched."""
    from orchestrator.runs.overrides import parse_predict_overrides
    from orchestrator.runs.scoring import fold_predictions

    rows = load_rows(_write(raw_rows(N_ROWS, N_ROWS + 12, labels=False), run_dir.parent / "fp8_rows.csv"),
                     require_labels=False)
    config_before = (run_dir / "config.yaml").read_text()
    exact_over = parse_predict_overrides(["model.dequant_cache=on"])
    fp8_over = parse_predict_overrides(["model.dequant_cache=on", "model.fp8_predict=true"])
    said = []
    (_, exact), = fold_predictions(run_dir, rows, [1], tta=False, device="cpu", log=said.append, overrides=exact_over)
    (_, fp8), = fold_predictions(run_dir, rows, [1], tta=False, device="cpu", log=said.append, overrides=fp8_over)
    assert "fp8 forward" not in said[0] and ", fp8 forward, batch" in said[1]
    assert 1e-5 < abs(fp8 - exact).max() < 0.1 and np.allclose(fp8.sum(axis=1), 1)
    assert (run_dir / "config.yaml").read_text() == config_before


def test_the_fp8_check_script_scores_a_folds_held_out_rows_exact_and_in_fp8(run_dir, capsys):
    """scripts/fp8_predict_check.py: predict's exact path gives the fold's own OOF log loss back; fp8 moves it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fp8_check", REPO / "scripts" / "fp8_predict_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--run", str(run_dir), "--folds", "1,2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["fold 1", "fold 2"]
    result = json.loads(lines[-1])
    held = pd.read_parquet(run_dir / "data.parquet")["fold"].isin([1, 2]).sum()
    assert result["rows"] == held
    assert abs(result["log_loss_exact"] - result["log_loss_oof"]) < 1e-5  # predict's path: the fold's own numbers
    assert result["log_loss_fp8"] != result["log_loss_exact"] and 0 < result["max_abs_change"] < 0.1
    with pytest.raises(Exception, match="lora.r: cannot be overridden"):
        script.main(["--run", str(run_dir), "lora.r=4"])


def test_efficiency_sets_predictions_rate_against_the_folds_steady_training_rate(run_dir, capsys):
    """``orchestrator.efficiency --predict-rows``: the first fold's model predicts the run's first rows twice per
    variant of predict's overrides, and each steady rows/s is divided by the fold's steady samples/s (batch x
    accumulation / steady seconds a step)."""
    import torch

    from orchestrator.efficiency import _predict_rates
    from orchestrator.perf.predict_rate import steady_training_rate
    from orchestrator.runs.overrides import parse_predict_overrides, run_config

    metrics = [json.loads((run_dir / f"fold={k}" / "metrics.json").read_text()) for k in (1, 2)]
    runs = [{"fold": 1, "s_per_step": 0.5}, {"fold": 2, "s_per_step": 9.0}]
    cfg = run_config(run_dir)
    assert steady_training_rate(cfg, runs[0]) == cfg.train.batch_size * cfg.train.grad_accum / 0.5
    assert steady_training_rate(cfg, runs[0], world_size=2) == 2 * steady_training_rate(cfg, runs[0])
    assert steady_training_rate(cfg, {"fold": 1, "s_per_step": None}) is None  # a run too short to be steady
    fp8 = "model.dequant_cache=on,model.fp8_predict=true"
    variants = [("as the run is configured", {}), (fp8, parse_predict_overrides(fp8.split(",")))]
    got = _predict_rates(run_dir, metrics, runs, 10, variants)
    assert [r["fold"] for r in got] == [1, 1] and [r["variant"] for r in got] == [v for v, _ in variants]
    training = steady_training_rate(cfg, runs[0])
    for r in got:
        assert r["rows"] == 10 and r["batch"] == cfg.train.eval_batch_size and r["rows_per_s"] > 0
        assert r["training_samples_per_s"] == training and r["ratio"] == pytest.approx(r["rows_per_s"] / training)
    out = capsys.readouterr().out
    assert "predict, fold 1's model (as the run is configured): 10 rows of the run's data" in out
    assert "predict, fold 1's model (model.dequant_cache=on,model.fp8_predict=true): 10 rows" in out
    assert out.count("predict rows/s to training samples/s (same call, CPU): ") == 2
    assert _predict_rates(run_dir, metrics, runs, 0, variants) == []  # no --predict-rows: nothing loads
    assert torch.is_grad_enabled()
