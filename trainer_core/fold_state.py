"""What a fold keeps on disk: its resumable checkpoints (trainable weights, optimizer, loss scaler, RNG state, step
and the seconds and samples spent so far) and, at the end, its files for the reducer, each written atomically with
``metrics.json`` last."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from trainer_core.config import Config, to_yaml
from trainer_core.modeling import load_trainable_state_dict, trainable_state_dict
from trainer_core.paths import atomic_write, atomic_write_dir, atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class FoldMetrics:
    """A finished fold's ``metrics.json``: its held-out scores, its size and what it cost."""

    fold: int
    log_loss: float
    accuracy: float
    n_rows: int  # held-out rows
    n_train_rows: int
    prior_log_loss: float  # the training rows' class prior on the held-out rows: the floor a model must beat
    steps: int
    train_seconds: float  # every run of this fold (pieces, restarts after a failure) together
    train_samples_per_s: float | None
    fold_seconds: float  # load + train + predict, every run of this fold
    last_run_seconds: float  # this run alone (a fold in pieces: its last piece)
    last_run_train_seconds: float
    resumed_from_step: int  # 0 unless this run continued from a checkpoint
    precision: str
    device: str
    world_size: int
    fingerprint: str
    n_extra_train_rows: int = 0  # data.extra_train_path rows this fold trained on
    extra_dropped_shared_prompt: int = 0  # extra rows left out: their prompt is also in this fold's held-out rows
    n_swapped_train_rows: int = 0  # train.swap_augment copies
    log_loss_tta: float | None = None  # with train.eval_tta
    accuracy_tta: float | None = None

    def to_dict(self) -> dict:
        """The JSON form; the TTA keys only when the fold scored them."""
        out = asdict(self)
        for key in ("log_loss_tta", "accuracy_tta"):
            if out[key] is None:
                del out[key]
        return out


def save_checkpoint(path: Path, model, optimizer, scaler, step: int, fingerprint: str, totals: dict) -> None:
    torch.save(trainable_state_dict(model), path / "trainable.pt")
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), path / "scaler.pt")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               path / "rng.pt")
    (path / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint, "totals": totals}))


def load_checkpoint(path: Path, model, optimizer, scaler, fingerprint: str) -> tuple[int, dict]:
    """Restores model, optimizer, scaler and RNG state; returns (step, totals so far: seconds and samples spent by the
    runs before this one)."""
    state = json.loads((path / "state.json").read_text())
    if state["fingerprint"] != fingerprint:
        raise ValueError(f"checkpoint {path} was written by a different config or fold; refusing to resume from it")
    load_trainable_state_dict(model, torch.load(path / "trainable.pt", map_location="cpu"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt"))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return int(state["step"]), state.get("totals", {})


def write_fold_files(out_dir: Path, cfg: Config, model, tok, oof: pd.DataFrame, result: dict) -> None:
    """Each file atomically, ``metrics.json`` last: it marks the fold as complete."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def save_adapter(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))

    atomic_write_dir(out_dir / "adapter", save_adapter)
    atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
    atomic_write(out_dir / "oof.parquet", lambda p: oof.to_parquet(p, index=False))
    atomic_write_json(out_dir / "metrics.json", result)
