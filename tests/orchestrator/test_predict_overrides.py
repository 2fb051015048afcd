"""``orchestrator.predict`` with ``key=value`` overrides: a run directory copied to another machine, whose base
weights sit in another folder there, predicts once ``model.name_or_path`` points at them - the same probabilities as
the run where it was trained. Keys that would change what the folds learned are refused in one line, as are unknown
keys, and nothing is written.

The run: one LoRA fold of the smoke recipe on a tiny pretrained Gemma-2 stored pre-quantized in a local folder
(tests/tiny_gemma.py), trained in this process (predict never touches Ray)."""

import shutil
import subprocess
import sys

import pandas as pd
import pytest

from orchestrator.reporting.reducer import reduce_run
from orchestrator.runs.overrides import PREDICT_KEYS, parse_predict_overrides
from orchestrator.runs.rundir import prepare_run_dir
from tests.conftest import CONFIGS, DATA, REPO
from trainer_core.config import ConfigError, load_config, validate
from trainer_core.fold.loop import train_fold

N_ROWS = 40


def predict(*args):
    return subprocess.run([sys.executable, "-m", "orchestrator.predict", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                              "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def moved(tmp_path_factory, nf4_gemma2_dir):
    """(original run dir, its copy, the folder the base weights moved to, rows to predict, the original's
    submission): the run trained on weights in ``here/``; then the weights move to ``there/`` and the run is
    copied."""
    root = tmp_path_factory.mktemp("moved")
    here = shutil.copytree(nf4_gemma2_dir, root / "here")
    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.max_rows={N_ROWS}", "data.max_length=64", "model.init=pretrained",
                                               f"model.name_or_path={here}", "model.tokenizer=null",
                                               "lora.freeze_layers=0"])
    validate(cfg)
    run = root / "run"
    rows = prepare_run_dir(cfg, run, [0], False, "python -m orchestrator.cv")
    train_fold(cfg, 0, rows, run / "fold=0")
    reduce_run(run, [0])
    new_rows = pd.read_csv(DATA).iloc[N_ROWS:N_ROWS + 12]
    new_rows.to_csv(root / "new.csv", index=False)
    res = predict("--run", run, "--data", root / "new.csv", "--out", root / "original.csv")
    assert res.returncode == 0, res.stderr[-3000:]
    there = root / "elsewhere" / "weights"
    there.parent.mkdir()
    shutil.move(here, there)
    copy = shutil.copytree(run, root / "copied" / "run", symlinks=True)
    return run, copy, there, root / "new.csv", pd.read_csv(root / "original.csv")


@pytest.mark.slow  # a trained fold, then orchestrator.predict three times, each a subprocess
def test_a_copied_run_predicts_where_its_weights_sit_elsewhere(moved, tmp_path):
    _, copy, there, new, original = moved
    res = predict("--run", copy, "--data", new, "--out", tmp_path / "sub.csv")
    assert res.returncode == 2 and "model.name_or_path" in res.stderr and "does not exist" in res.stderr
    assert not (tmp_path / "sub.csv").exists()
    res = predict("--run", copy, "--data", new, "--out", tmp_path / "sub.csv", f"model.name_or_path={there}",
                  "train.eval_batch_size=3")
    assert res.returncode == 0, res.stderr[-3000:]
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert list(sub["id"]) == list(original["id"])
    cols = ["winner_model_a", "winner_model_b", "winner_tie"]
    assert sub[cols].to_numpy() == pytest.approx(original[cols].to_numpy(), abs=1e-5)


@pytest.mark.parametrize("override, says", [
    ("lora.r=4", "lora.r: cannot be overridden for prediction"),
    ("model.quantization=none", "model.quantization: cannot be overridden for prediction"),
    ("model.nope=1", "unknown config key 'model.nope'"),
    ("train.eval_batch_size=many", "train.eval_batch_size: expected"),
    ("model.name_or_path", "is not of the form key=value"),
])
def test_overrides_that_would_change_the_folds_or_are_unknown_are_one_line(moved, tmp_path, override, says):
    _, copy, _, new, _ = moved
    res = predict("--run", copy, "--data", new, "--out", tmp_path / "sub.csv", override)
    assert res.returncode == 2 and says in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sub.csv").exists()


def test_allowed_keys_parse_and_refusals_name_them():
    assert parse_predict_overrides(["model.compile=off", "model.compile_options.coordinate_descent_tuning=true",
                                    "train.precision=bf16", "model.fp8_predict=true"]) == {
        "model.compile": False, "model.compile_options.coordinate_descent_tuning": True, "train.precision": "bf16",
        "model.fp8_predict": True}
    with pytest.raises(ConfigError) as e:
        parse_predict_overrides(["data.max_length=2048"])
    assert all(k in str(e.value) for k in PREDICT_KEYS)


def test_help_names_the_overrides():
    from orchestrator.predict import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "key=value" in text and "model.name_or_path=/kaggle/input/gemma2" in text
