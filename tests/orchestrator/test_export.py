"""orchestrator.export on a real smoke run, and the standalone predictor it writes, run where importing ray,
orchestrator or trainer_core fails and from outside the repository: ``each`` gives orchestrator.predict's numbers,
an average of one fold's adapter with itself gives that fold's, a merge adds exactly the adapter, and bad input
(mismatched adapters, an unfinished run, a missing file, a DIR in use) is one line with nothing left behind.

The run is built in this process (tests/orchestrator/smoke_run.py: five folds of the smoke model, no Ray)."""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from orchestrator.export import LOGS_MODULE, PREDICTOR_REQUIREMENTS, copy_predictor
from orchestrator.export import main as export_main
from orchestrator.predict import predict_submission
from orchestrator.reporting.calibration import apply_temperature
from tests.conftest import CONFIGS, DATA, REPO
from tests.orchestrator.smoke_run import N_ROWS, build_smoke_run
from trainer_core.config import load_config
from trainer_core.data.arena import load_rows
from trainer_core.data.tta import tta_average

TEMPLATE = REPO / "orchestrator" / "export_template"
# the offline notebook: none of the project's packages nor Ray can be imported, and the cwd is not the repository
BLOCKED = ("import sys, runpy\nfor m in ('ray', 'orchestrator', 'trainer_core'): sys.modules[m] = None\n"
           "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_smoke_run(tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def test_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("test") / "test.csv"
    df = pd.read_csv(DATA).iloc[N_ROWS:N_ROWS + 20].drop(columns=["winner_model_a", "winner_model_b", "winner_tie"])
    df.iloc[2, df.columns.get_loc("response_a")] = json.dumps([None, "second turn"])  # a null turn
    df.to_csv(path, index=False)
    return path


def twin_run(run_dir, tmp_path):
    """A copy of the run with folds 0 and 1 only, fold 1's files being fold 0's."""
    twin = tmp_path / "twin"
    twin.mkdir()
    for name in ("run.json", "config.yaml", "data.parquet", "fold=0"):
        (shutil.copytree if name.startswith("fold") else shutil.copy)(run_dir / name, twin / name)
    shutil.copytree(run_dir / "fold=0", twin / "fold=1")
    report = json.loads((run_dir / "report.json").read_text())
    report["folds"] = [f for f in report["folds"] if f["fold"] in (0, 1)]
    (twin / "report.json").write_text(json.dumps(report))
    return twin


def offline_predict(export_dir, data, out, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", BLOCKED, str(export_dir / "predict.py"), "--data", str(data),
                          "--out", str(out), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return pd.read_csv(out), res.stdout


@pytest.fixture
def template(tmp_path, monkeypatch):
    """Loads a module of the predictor as DIR/predict.py does: from a folder holding the template's files and the two
    project files the export copies beside them (arena_text.py, arena_logs.py), that folder first on sys.path."""
    folder = tmp_path / "predictor"
    folder.mkdir()
    copy_predictor(folder)
    monkeypatch.syspath_prepend(str(folder))
    for name in ("arena_text", "arena_logs", "submission_text", "submission_model"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    def load(name):
        spec = importlib.util.spec_from_file_location(f"template_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    load.folder = folder
    yield load
    for name in ("arena_text", "arena_logs", "submission_text", "submission_model"):  # this folder's modules go with it
        sys.modules.pop(name, None)


def test_the_blocker_really_blocks(tmp_path):
    (tmp_path / "probe.py").write_text("import trainer_core\n")
    res = subprocess.run([sys.executable, "-c", BLOCKED, str(tmp_path / "probe.py")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "import of trainer_core halted" in res.stderr


def test_each_export_predicts_what_orchestrator_predict_does_without_the_project(run_dir, test_csv, tmp_path):
    assert export_main([str(run_dir), "--out", str(tmp_path / "ex")]) == 0
    sub, stdout = offline_predict(tmp_path / "ex", test_csv, tmp_path / "sub.csv", cwd=tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    rows = load_rows(test_csv, require_labels=False)
    expected = predict_submission(run_dir, rows, [0, 1, 2, 3, 4], tta=True, temperature=report["temperature_tta"],
                                  device="cpu", log=lambda *_: None)
    assert sub["id"].tolist() == rows["id"].tolist()
    assert np.abs(sub[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy() - expected).max() < 1e-5
    assert "rows/s" in stdout and "ETA" in stdout and "(20 with TTA)" in stdout

    # the manifest lists every other file with its sha256, and the predictor can check them
    manifest = json.loads((tmp_path / "ex" / "manifest.json").read_text())["files"]
    files = {str(p.relative_to(tmp_path / "ex")) for p in (tmp_path / "ex").rglob("*") if p.is_file()}
    assert set(manifest) == files - {"manifest.json"}
    assert {"predict.py", "export_config.json", "EXPORT.md", "requirements.txt", "base/model.safetensors",
            "adapters/fold=3/adapter_model.safetensors", "tokenizer/tokenizer.json"} <= files
    for rel, entry in manifest.items():
        assert hashlib.sha256((tmp_path / "ex" / rel).read_bytes()).hexdigest() == entry["sha256"]
    assert (tmp_path / "ex" / "requirements.txt").read_text().split() == list(PREDICTOR_REQUIREMENTS)
    spec = json.loads((tmp_path / "ex" / "export_config.json").read_text())
    assert spec["temperature"] == report["temperature"] and spec["text"]["truncation"] == "balanced"
    # the text rules it ran are the project's own file, not a second copy that could drift
    assert (tmp_path / "ex" / "arena_text.py").read_bytes() == (REPO / "trainer_core/data/text.py").read_bytes()


@pytest.mark.slow  # three end-to-end runs of the exported predictor, each a subprocess
def test_a_time_budget_already_spent_keeps_every_row_and_skips_the_swapped_pass(run_dir, test_csv, tmp_path):
    assert export_main([str(run_dir), "--out", str(tmp_path / "ex"), "--folds", "average"]) == 0
    sub, stdout = offline_predict(tmp_path / "ex", test_csv, tmp_path / "sub.csv", "--time-budget", "1",
                                  cwd=tmp_path)
    p = sub[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    assert len(sub) == 20 and np.isfinite(p).all() and np.allclose(p.sum(1), 1.0) and (p > 0).all()
    assert "swapped pass on 0/20 rows" in stdout and "(0 with TTA)" in stdout
    no_tta, plain_out = offline_predict(tmp_path / "ex", test_csv, tmp_path / "plain.csv", "--no-tta",
                                        cwd=tmp_path)
    assert np.allclose(p, no_tta[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy(), atol=1e-12)
    # --precision picks the compute dtype on any device (fp16 on a bf16 card checks what a T4 will compute)
    low, out = offline_predict(tmp_path / "ex", test_csv, tmp_path / "bf16.csv", "--no-tta", "--precision", "bf16",
                               cwd=tmp_path)
    diff = np.abs(low[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy() - p).max()
    assert "cpu (bf16)" in out and "cpu (fp32)" in plain_out and 0 < diff < 0.05
    text = (tmp_path / "ex" / "EXPORT.md").read_text()
    report = json.loads((run_dir / "report.json").read_text())
    assert "no honest CV exists for it" in text and f"{report['cv_log_loss']:.4f}" in text


def test_averaging_a_fold_with_itself_reproduces_that_fold(run_dir, test_csv, tmp_path):
    twin = twin_run(run_dir, tmp_path)
    assert export_main([str(twin), "--out", str(tmp_path / "avg"), "--folds", "average"]) == 0
    sub, _ = offline_predict(tmp_path / "avg", test_csv, tmp_path / "sub.csv", "--no-tta", cwd=tmp_path)
    report = json.loads((twin / "report.json").read_text())
    rows = load_rows(test_csv, require_labels=False)
    fold0 = predict_submission(twin, rows, [0], tta=False, temperature=report["temperature"], device="cpu",
                               log=lambda *_: None)
    assert np.abs(sub[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy() - fold0).max() < 1e-5


def test_merge_adds_exactly_the_averaged_adapter(run_dir, test_csv, tmp_path, template):
    # Merged weights are W + scaling B A in fp32. On the CPU bitsandbytes computes nf4 layers from bf16-rounded
    # weights, so the reference is fold 0's adapter on the same base dequantized (transformers' dequantize()).
    import torch
    from peft import PeftModel

    twin = twin_run(run_dir, tmp_path)
    assert export_main([str(twin), "--out", str(tmp_path / "m"), "--folds", "average", "--merge",
                        "--quantize", "none"]) == 0
    assert not (tmp_path / "m" / "adapters").exists() and (tmp_path / "m" / "model" / "model.safetensors").exists()
    model = template("submission_model")
    spec = json.loads((tmp_path / "m" / "export_config.json").read_text())
    cpu = torch.device("cpu")
    merged = model.Scorer(tmp_path / "m", spec, cpu, pad_id=0)
    each = tmp_path / "each"
    assert export_main([str(twin), "--out", str(each)]) == 0
    base = model.load_classifier(each / "base", spec, "nf4", torch.float32, cpu, 0).dequantize()
    reference = PeftModel.from_pretrained(base, str(each / "adapters" / "fold=0")).eval()
    ids = torch.randint(4, 200, (3, 40))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = torch.softmax(reference(input_ids=ids, attention_mask=mask).logits, -1)
    assert torch.allclose(merged.probs("average", ids, mask), expected, atol=1e-5)


def test_mismatched_adapters_are_refused_in_one_line_and_nothing_is_written(run_dir, tmp_path):
    twin = twin_run(run_dir, tmp_path)
    cfg_path = twin / "fold=1" / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 4
    cfg_path.write_text(json.dumps(cfg))
    res = subprocess.run([sys.executable, "-m", "orchestrator.export", str(twin), "--out", str(tmp_path / "x"),
                          "--folds", "average"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "fold 1's adapter has r=4, fold 0's 8" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twin"]


def test_bad_input_is_one_line_and_leaves_nothing(run_dir, tmp_path, capsys):
    twin = twin_run(run_dir, tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    assert export_main([str(twin), "--out", str(tmp_path / "busy")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    (twin / "fold=1" / "adapter" / "adapter_model.safetensors").unlink()
    assert export_main([str(twin), "--out", str(tmp_path / "x")]) == 2
    assert "fold=1/adapter/adapter_model.safetensors: missing" in capsys.readouterr().err
    (twin / "report.json").unlink()
    assert export_main([str(twin), "--out", str(tmp_path / "x")]) == 2
    assert "not a finished run (no report.json)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "twin"]
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["x"]


def test_swapped_rows_go_to_the_least_confident_first_within_the_budget(template):
    choose = template("predict").choose_swapped_rows
    confidence = np.array([0.9, 0.4, 0.6, 0.35, 0.8])
    cost = np.array([1.0, 2.0, 1.0, 1.0, 1.0])
    assert choose(confidence, cost, 100.0).tolist() == [3, 1, 2, 4, 0]
    assert choose(confidence, cost, 3.5).tolist() == [3, 1]  # 1 + 2 s fit; the next row (1 s) would not
    assert choose(confidence, cost, 3.0).tolist() == [3, 1]  # exactly the budget still fits
    assert choose(confidence, cost, 0.5).tolist() == []


def test_combining_is_the_projects_temperature_and_tta_maths(template):
    combine = template("predict").combine
    rng = np.random.default_rng(0)
    plain = {k: rng.dirichlet([1, 1, 1], 6) for k in ("a", "b")}
    swapped = {k: rng.dirichlet([1, 1, 1], 6) for k in ("a", "b")}
    swapped["b"][4] = np.nan  # model b never scored row 4 swapped: row 4 keeps its plain prediction in both
    got, tta = combine(plain, swapped, 0.8, 1.3)
    assert tta.tolist() == [True, True, True, True, False, True]
    from trainer_core.metrics import clip_probs

    for i in range(6):
        expect = sum(apply_temperature(clip_probs(tta_average(clip_probs(plain[k][i:i + 1]), swapped[k][i:i + 1]))
                                       if tta[i] else clip_probs(plain[k][i:i + 1]), 1.3 if tta[i] else 0.8)
                     for k in ("a", "b")) / 2
        assert np.allclose(got[i], clip_probs(expect)[0], atol=1e-12)


@pytest.mark.parametrize("overrides", [["data.truncation=end"], ["data.truncation=left"], ["data.truncation=balanced"],
                                       ["data.truncation=balanced", "data.prompt_share=0.2"],
                                       ["model.head=pairwise", "lora.enabled=false"]])
def test_the_exported_predictor_encodes_exactly_as_the_project(overrides, template):
    from orchestrator.export import text_spec
    from trainer_core.data.tokenization import build_tokenizer, encode

    cfg = load_config(CONFIGS / "smoke.yaml", ["data.max_length=48", *overrides])
    text = template("submission_text")  # as predict.py imports it: its neighbours from the export folder
    assert text.encode_text.__module__ == "arena_text" and text.__file__ == str(template.folder / "submission_text.py")
    rows = text.read_test(DATA).iloc[:40]
    rows.loc[3, "response_b"] = "word " * 5000  # far past the budget: cut before tokenizing
    rows.loc[5, "prompt"] = ""
    tok = build_tokenizer(cfg.model)
    assert text.encode(rows, tok, text_spec(cfg), cfg.model.head) == encode(rows, tok, cfg)


def test_help_documents_every_flag():
    res = subprocess.run([sys.executable, "-m", "orchestrator.export", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    for flag in ("--out", "--folds", "each", "average", "--merge", "--quantize", "int8", "nf4"):
        assert flag in res.stdout, flag
    res = subprocess.run([sys.executable, str(TEMPLATE / "predict.py"), "--help"], capture_output=True, text=True,
                         timeout=60)
    for flag in ("--data", "--out", "--time-budget", "--no-tta", "--batch-tokens", "--device", "--verify",
                 "--precision"):
        assert flag in res.stdout, flag


@pytest.mark.slow  # trains two folds, then the exported predictor in a subprocess
def test_a_pairwise_run_with_length_features_exports_and_predicts_as_orchestrator_predict(test_csv, tmp_path):
    from orchestrator.reporting.reducer import reduce_run
    from orchestrator.runs.rundir import prepare_run_dir
    from trainer_core.config import validate
    from trainer_core.fold.loop import train_fold

    cfg = load_config(CONFIGS / "demo_cpu.yaml", ["data.max_rows=40", "data.n_folds=2", "data.max_length=32",
                                                  "train.max_steps=2", "train.batch_size=4", "train.lr=1e-3",
                                                  "model.length_features=true"])
    validate(cfg)
    run = tmp_path / "run"
    rows = prepare_run_dir(cfg, run, [0, 1], False, "test")
    for k in (0, 1):
        train_fold(cfg, k, rows, run / f"fold={k}")
    reduce_run(run, [0, 1])
    assert export_main([str(run), "--out", str(tmp_path / "ex")]) == 0
    assert json.loads((tmp_path / "ex" / "export_config.json").read_text())["length_features"] is True
    sub, _ = offline_predict(tmp_path / "ex", test_csv, tmp_path / "sub.csv", cwd=tmp_path)
    report = json.loads((run / "report.json").read_text())
    expected = predict_submission(run, load_rows(test_csv, require_labels=False), [0, 1], tta=False,
                                  temperature=report["temperature"], device="cpu", log=lambda *_: None)
    got = sub[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(got[:, 0] - got[:, 1]).max() > 1e-3  # the rows are told apart (not an all-prior model)

    # a joint head the standalone predictor cannot rebuild is refused in one line, before anything is written
    cfg_path = run / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("head: pairwise", "head: joint"))
    assert export_main([str(run), "--out", str(tmp_path / "joint")]) == 2 and not (tmp_path / "joint").exists()


def test_bitsandbytes_int8_line_is_logged_once_however_many_matmuls(caplog, tmp_path, monkeypatch):
    """trainer_core/logs.py, which the export carries as arena_logs.py (and training and orchestrator.predict use)."""
    from trainer_core import logs

    log = logging.getLogger(logs.CHATTY_LOGGERS[0])
    monkeypatch.setattr(log, "filters", [])  # a filter another test's model added has seen these lines already
    logs.quiet_repeated_logs()
    logs.quiet_repeated_logs()  # idempotent: one filter
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(5):
            log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        log.warning("another line")
    assert [r.getMessage() for r in caplog.records] == [
        "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization", "another line"]
    assert sum(isinstance(f, logs.OnceFilter) for f in log.filters) == 1
    copy_predictor(tmp_path)
    assert (tmp_path / LOGS_MODULE).read_bytes() == (REPO / "trainer_core/logs.py").read_bytes()
    assert "from arena_logs import quiet_repeated_logs" in (tmp_path / "submission_model.py").read_text()
