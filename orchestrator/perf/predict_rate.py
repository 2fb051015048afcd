"""Prediction's rate against training's, in one process after a run (``orchestrator.efficiency --predict-rows``).

A finished fold's model is loaded as ``orchestrator.predict`` loads it (``load_fold_model``: the fast path placed
for prediction, with predict's overrides, e.g. ``model.fp8_predict=true``) and scores the first rows of the run's own
``data.parquet`` (the length mix the fold trained on) twice, in the batch ``train.eval_batch_size`` resolves to: the
first pass compiles each batch length's graphs (or reads those its fold compiled for the same shapes from the run's
compile cache, as predict does), the second reads them, so its rows/s is prediction's steady rate. The
ratio to the fold's steady training samples/s (its steady seconds a step, from its logs) is issue 29's line "predict
rows/s to training samples/s": a training sample costs a forward and a backward pass, a predicted row a forward one.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch


def steady_training_rate(cfg, run_row: dict, world_size: int = 1) -> float | None:
    """Training samples/s at a fold's steady pace: samples a step (batch x accumulation x ranks) over the steady
    seconds a step of its run (``orchestrator.perf.fold_timeline.breakdown``'s ``s_per_step``)."""
    step = run_row.get("s_per_step")
    return cfg.train.batch_size * cfg.train.grad_accum * world_size / step if step else None


def measure(run_dir: Path, fold: int, n_rows: int, overrides: dict, device: torch.device) -> dict:
    """Two passes of fold ``fold``'s model over the first ``n_rows`` rows of the run's data, on ``device``."""
    from orchestrator.runs.compile_cache import run_compile_cache
    from orchestrator.runs.overrides import run_config
    from trainer_core.config import pad_multiple
    from trainer_core.data.batching import row_tokens
    from trainer_core.data.tokenization import encode, features
    from trainer_core.fastpath import release
    from trainer_core.fold.inference import load_fold_model, predict_probs, resolve_eval_batch_size
    from trainer_core.model.precision import make_autocast

    cfg = run_config(run_dir, overrides)
    rows = pd.read_parquet(Path(run_dir) / "data.parquet").iloc[:n_rows].reset_index(drop=True)
    with run_compile_cache(cfg, run_dir):
        t = time.perf_counter()
        model, tok, precision = load_fold_model(cfg, Path(run_dir) / f"fold={fold}" / "adapter", device)
        load_s = time.perf_counter() - t
        ids, feats = encode(rows, tok, cfg), features(rows, tok, cfg)
        batch = resolve_eval_batch_size(cfg.train.eval_batch_size, model, ids, device,
                                        train_batch=cfg.train.batch_size, budget_gib=cfg.train.memory_budget_gib)
        autocast = make_autocast(precision, device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        rates = []
        for _ in ("compiles", "steady"):
            sync()
            t = time.perf_counter()
            predict_probs(model, ids, batch, tok.pad_token_id, device, autocast, None, pad_multiple(cfg.model),
                          feats)
            sync()
            rates.append(len(ids) / (time.perf_counter() - t))
        release(model)
    return {"fold": fold, "rows": len(ids), "mean_tokens": sum(map(row_tokens, ids)) / max(1, len(ids)),
            "batch": batch, "load_s": load_s, "first_pass_rows_per_s": rates[0], "rows_per_s": rates[1]}


def format_rate(r: dict, training: float | None, card: str) -> str:
    """Two lines: the passes of ``r`` (:func:`measure`'s, with its ``variant`` name), then issue 29's line (when the
    fold's steady training rate is known)."""
    text = (f"predict, fold {r['fold']}'s model ({r['variant']}): {r['rows']} rows of the run's data (mean "
            f"{r['mean_tokens']:.0f} tokens), batch {r['batch']}; first pass {r['first_pass_rows_per_s']:.1f} rows/s "
            f"(compiles), second {r['rows_per_s']:.1f} rows/s")
    if training:
        text += (f"\npredict rows/s to training samples/s (same call, {card}): {r['rows_per_s'] / training:.2f} "
                 f"({r['rows_per_s']:.1f} against the fold's steady {training:.1f})")
    return text
