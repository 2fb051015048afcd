"""A sweep's leaderboard and best.yaml say that the winner was chosen on the folds that score it (no Ray)."""

import yaml

from orchestrator.sweep.leaderboard import best_trial, build_leaderboard, format_leaderboard, write_best_yaml
from tests.conftest import CONFIGS
from trainer_core.config import load_config


def records():
    return [{"trial_id": t, "overrides": {"train.lr": lr}, "status": "complete",
             "metrics": {"log_loss": ll, "accuracy": 0.5, "fold_0_log_loss": ll, "time_total_s": 1.0}}
            for t, lr, ll in (("a", 1e-3, 0.90), ("b", 2e-3, 0.88), ("c", 5e-3, 0.93))]


def test_the_winner_is_said_to_be_chosen_on_the_folds_that_score_it(tmp_path):
    board = build_leaderboard(records(), ["train.lr"], [0], tmp_path)
    text = format_leaderboard(board, ["train.lr"])
    assert "chosen on the same folds it is scored on" in text and "over 3 trials" in text
    best = best_trial(board)
    assert best["trial"] == "b"
    cfg = write_best_yaml(load_config(CONFIGS / "smoke.yaml"), best, ["train.lr"], [0], tmp_path / "best.yaml", 3)
    head = (tmp_path / "best.yaml").read_text()
    comments = " ".join(line[2:] for line in head.splitlines() if line.startswith("#"))
    assert "chosen on the same folds it is scored on" in comments and "optimistic" in comments
    assert yaml.safe_load(head)["train"]["lr"] == cfg.train.lr == 2e-3  # still a runnable config
