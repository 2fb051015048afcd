"""The report's recipe from a run directory's files alone: sessions.json (start, GPUs), the folds' metrics.json (card,
end), config.yaml (keys off their default) and the TensorBoard events (loss curves, a resumed fold's later events
winning, read without TensorBoard's "No path found after <file>" line reaching the commands' INFO console), and a run
from before those files existed still reports."""

import json
import logging
import time

from torch.utils.tensorboard import SummaryWriter

from orchestrator.reporting.reducer import reduce_run
from tests.orchestrator.synthetic_runs import bundled_rows, make_run, noisy_probs
from trainer_core.config import load_config, to_yaml


def test_recipe_reads_sessions_fold_metrics_config_and_tensorboard(tmp_path, caplog):
    rows = bundled_rows(60, n_folds=2)
    out = make_run(tmp_path / "run", rows, noisy_probs(rows["label"].to_numpy(), 1.0, seed=0),
                   data_path="/data/train.csv", data_sha256="ab" * 32, n_rows=60)
    (out / "config.yaml").write_text(to_yaml(load_config(None, ["train.lr=1e-3", "model.name_or_path=org/m"])))
    t0 = time.time() - 3600
    (out / "sessions.json").write_text(json.dumps([
        {"started_at": t0, "gpus": 4, "model_revision": "c0ffee"}, {"started_at": t0 + 600, "gpus": 8}]))
    for k in (0, 1):
        m = json.loads((out / f"fold={k}" / "metrics.json").read_text())
        m.update(gpu_name="NVIDIA H100 80GB HBM3", world_size=2, finished_at=t0 + 1000 + k)
        (out / f"fold={k}" / "metrics.json").write_text(json.dumps(m))
    first = SummaryWriter(str(out / "tensorboard" / "fold=1"))
    for step in (10, 20, 30):
        first.add_scalar("train_loss", 1.0, step)
    first.close()
    resumed = SummaryWriter(str(out / "tensorboard" / "fold=1"))  # resumed from step 20: logs step 30 again
    for step in (30, 40):
        resumed.add_scalar("train_loss", 0.5, step)
    resumed.close()
    with caplog.at_level(logging.INFO):  # the level orchestrator.cv's console logs at
        recipe = reduce_run(out, [0, 1])["recipe"]
    assert not [r for r in caplog.records if r.name.startswith("tensorboard")], caplog.text
    assert recipe["loss_curves"] == {"0": [], "1": [[10, 1.0], [20, 1.0], [30, 0.5], [40, 0.5]]}
    assert recipe["non_default"] == {"model.name_or_path": "org/m", "train.lr": 1e-3}
    assert recipe["wall_seconds"] == 1001 and recipe["sessions"] == 2 and recipe["cluster_gpus"] == 8
    assert recipe["gpu_type"] == "NVIDIA H100 80GB HBM3" and recipe["gpus_per_fold"] == 2
    assert recipe["model"] == "org/m" and recipe["model_revision"] == "c0ffee"
    assert recipe["data_sha256"] == "ab" * 32 and recipe["data_rows"] == 60
    html = (out / "report.html").read_text()
    assert "org/m (revision c0ffee)" in html and "2 sessions: resumed" in html and "H100" in html
    assert (out / "report_plots" / "loss.png").exists()


def test_a_run_from_before_the_recipe_files_still_reports(tmp_path):
    rows = bundled_rows(40, n_folds=2)
    out = make_run(tmp_path / "run", rows, noisy_probs(rows["label"].to_numpy(), 1.0, seed=1))
    recipe = json.loads((out / "report.json").read_text())["recipe"]
    assert recipe["started_at"] is None and recipe["wall_seconds"] is None and recipe["gpu_type"] is None
    assert recipe["loss_curves"] == {"0": [], "1": []} and not (out / "report_plots" / "loss.png").exists()
    assert "<h2>Recipe</h2>" in (out / "report.html").read_text()
