"""A sweep's results as files: ``leaderboard.csv`` (one row per trial, best first) and ``best.yaml`` (the base config
with the best trial's values, runnable as is by ``orchestrator.cv --config``). No Ray here."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd

from trainer_core.config import Config, apply_overrides, to_yaml
from trainer_core.paths import atomic_write, atomic_write_text

STATUS_ORDER = {"complete": 0, "unfinished": 1, "stopped": 2, "error": 3}
# The winner is the trial with the lowest OOF log loss on the very folds that score it: picking the best of many noisy
# figures favours one that got lucky on these rows, so its figure is optimistic (selection bias), the more so the more
# trials there were. Said wherever the winner's figure is shown.
SELECTION_NOTE = ("the best trial was chosen on the same folds it is scored on, so its OOF log loss is optimistic "
                  "(selection bias over {n} trials); for an honest figure rerun best.yaml with another train.seed, or "
                  "score it on rows the sweep never saw")


def build_leaderboard(records: list[dict], keys: list[str], folds: list[int], sweep_dir: Path) -> pd.DataFrame:
    """``records`` from ``ray_sweep.trial_records``; complete trials sorted by OOF log loss, then stopped, then failed
    ones (those by their last interim loss)."""
    rows = []
    for r in records:
        m = r["metrics"]
        row = {"trial": r["trial_id"], **{k: r["overrides"].get(k) for k in keys},
               "log_loss": m.get("log_loss"), "accuracy": m.get("accuracy"),
               **{f"fold_{k}_log_loss": m.get(f"fold_{k}_log_loss") for k in folds},
               "status": r["status"], "last_interim_log_loss": m.get("interim_log_loss"),
               "steps": m.get("sweep_step"), "wall_s": round(m["time_total_s"], 1) if "time_total_s" in m else None,
               "trial_dir": str(sweep_dir / f"trial={r['trial_id']}"), "error": r.get("error")}
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["_order"] = df["status"].map(STATUS_ORDER)
    df["_loss"] = df["log_loss"].fillna(df["last_interim_log_loss"]).fillna(math.inf)
    return df.sort_values(["_order", "_loss", "trial"]).drop(columns=["_order", "_loss"]).reset_index(drop=True)


def write_leaderboard(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda p: df.to_csv(p, index=False))


def best_trial(df: pd.DataFrame) -> pd.Series | None:
    done = df[df["status"] == "complete"] if not df.empty else df
    return None if done.empty else done.iloc[0]


def write_best_yaml(base: Config, best: pd.Series, keys: list[str], folds: list[int], path: Path,
                    n_trials: int | None = None) -> Config:
    """The full resolved base config with the best trial's searched values, opening with how to run it and why its
    figure is optimistic (SELECTION_NOTE)."""
    values = {k: _plain(best[k]) for k in keys}
    cfg = apply_overrides(base, values)
    note = SELECTION_NOTE.format(n=n_trials if n_trials is not None else "the sweep's")
    header = [
        f"# best: {base.experiment} with the best values of the sweep in {path.parent} - trial {best['trial']},",
        f"# OOF log loss {best['log_loss']:.4f} over fold(s) {','.join(map(str, folds))}; searched: "
        + " ".join(f"{k}={v}" for k, v in values.items()),
        *textwrap.wrap(f"NOTE: {note}.", 116, initial_indent="# ", subsequent_indent="# "),
        "# Run every fold with it:",
        f"#   python -m orchestrator.cv --config {path} --folds 0-{base.data.n_folds - 1}",
    ]
    atomic_write_text(path, "\n".join(header) + "\n" + to_yaml(cfg))
    return cfg


def _plain(v):
    """pandas/numpy scalars back to Python values (YAML and the config's type checks expect them)."""
    return v.item() if hasattr(v, "item") else v


def format_leaderboard(df: pd.DataFrame, keys: list[str]) -> str:
    """The plain-text table the command ends with."""
    cols = ["trial", *keys, "log_loss", "accuracy", "status", "last_interim_log_loss", "steps", "wall_s"]
    shown = df[cols].copy()
    for c in ("log_loss", "accuracy", "last_interim_log_loss"):
        shown[c] = shown[c].map(lambda x: "-" if x is None or pd.isna(x) else f"{x:.4f}")
    for c in keys:
        shown[c] = shown[c].map(lambda x: f"{x:.3g}" if isinstance(x, float) else str(x))
    shown = shown.rename(columns={"last_interim_log_loss": "interim_ll"}).fillna("-")
    done = int((df["status"] == "complete").sum())
    note = f"\nnote: {SELECTION_NOTE.format(n=done)}." if done > 1 else ""
    return shown.to_string(index=False) + note
