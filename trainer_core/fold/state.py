"""What a fold keeps on disk: its resumable checkpoints (trainable weights, optimizer, loss scaler, every rank's RNG
state, step and the seconds and samples spent so far; tensors or JSON, never pickled objects) and, at the end, its
files for the reducer, each written atomically with ``metrics.json`` last."""

from __future__ import annotations

import base64
import json
import pickle
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from trainer_core.config import Config, to_yaml
from trainer_core.model.build import load_trainable_state_dict, trainable_state_dict
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
    # torch.compile's recompilations in this run (trainer_core.fastpath.recompiles); None: not counted (TORCH_LOGS)
    recompilations: int | None = None
    # cluster.compile_helpers (trainer_core.fold.warm_compile): how many ran, seconds from their start until the fold
    # could place its model, and how many failed; absent when none ran
    compile_helpers: dict | None = None

    def to_dict(self) -> dict:
        """The JSON form; the TTA keys only when the fold scored them."""
        out = asdict(self)
        for key in ("log_loss_tta", "accuracy_tta", "compile_helpers"):
            if out[key] is None:
                del out[key]
        return out


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: another config or fold, or files that are not plain data."""


def save_checkpoint(path: Path, model, optimizer, scaler, step: int, fingerprint: str, totals: dict,
                    rng_states: list[dict]) -> None:
    """Tensors with ``torch.save`` (read back with ``weights_only=True``), everything else as JSON; ``rng_states``:
    :func:`rng_state` of every rank, in rank order."""
    torch.save(trainable_state_dict(model), path / "trainable.pt")
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), path / "scaler.pt")
    (path / "rng.json").write_text(json.dumps({"ranks": rng_states}))
    (path / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint, "totals": totals}))


def load_checkpoint(path: Path, model, optimizer, scaler, fingerprint: str, *, rank: int = 0,
                    device: torch.device | None = None) -> tuple[int, dict]:
    """Restores model, optimizer, scaler and this rank's RNG state (CPU, and CUDA on a GPU); returns (step, totals so
    far: seconds and samples spent by the runs before this one).

    Nothing in a checkpoint is executed: tensors load with ``weights_only=True``, the rest is JSON; a file holding
    pickled Python objects (a checkpoint planted in a shared run directory, or one from before this format) is
    refused with :class:`CheckpointError`."""
    state = json.loads((path / "state.json").read_text())
    if state["fingerprint"] != fingerprint:
        raise CheckpointError(f"checkpoint {path} was written by a different config or fold; refusing to resume "
                              f"from it")
    if not (path / "rng.json").exists():
        raise CheckpointError(f"checkpoint {path} has no rng.json (written by an older version that pickled its RNG "
                              f"state); refusing to load it: delete it to train the fold from its start")
    load_trainable_state_dict(model, _load_tensors(path / "trainable.pt"))
    optimizer.load_state_dict(_load_tensors(path / "optimizer.pt"))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(_load_tensors(path / "scaler.pt"))
    ranks = json.loads((path / "rng.json").read_text())["ranks"]
    if rank < len(ranks):  # a rank the checkpoint has no state for (more ranks than when saved) keeps its own seed
        set_rng_state(ranks[rank], device or torch.device("cpu"))
    return int(state["step"]), state.get("totals", {})


def _load_tensors(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"checkpoint file {path} holds pickled Python objects{what}, not only tensors and "
                              f"plain values; refusing to load it (loading could run code)") from None


def rng_state(device: torch.device) -> dict:
    """This process's random state as JSON-ready values: Python, NumPy, torch CPU and, on a GPU, the device's CUDA
    generator (dropout on a GPU draws from it, so without it a resumed fold on a GPU would not be exact)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(mt), gauss],
           "numpy": {"keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
           "torch": _b64(torch.get_rng_state())}
    if device.type == "cuda":
        out["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return out


def set_rng_state(state: dict, device: torch.device) -> None:
    """Undo :func:`rng_state` (the CUDA part only on a GPU, and only if the state has one)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(_unb64(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_unb64(state["cuda"]), device)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def write_fold_files(out_dir: Path, cfg: Config, model, tok, oof: pd.DataFrame, result: dict) -> None:
    """Each file atomically, ``metrics.json`` last: it marks the fold as complete."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def save_adapter(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))

    atomic_write_dir(out_dir / "adapter", save_adapter)
    atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
    atomic_write(out_dir / "oof.parquet", lambda p: oof.to_parquet(p, index=False))
    dev = next(model.parameters()).device  # the report's recipe: which card, and when the fold ended (epoch seconds)
    atomic_write_json(out_dir / "metrics.json", {**result, "gpu_name": torch.cuda.get_device_name(dev) if dev.type
                                                 == "cuda" else None, "finished_at": time.time()})
