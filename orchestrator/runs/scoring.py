"""A finished run's fold models scoring new rows: one model at a time, each released before the next loads; an
ensemble's members combined with its weights. No Ray: ``orchestrator.predict`` and the soft-label export use it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from orchestrator.runs.compile_cache import run_compile_cache
from orchestrator.runs.overrides import run_config
from orchestrator.runs.provenance import ENSEMBLE_FILE, is_ensemble, member_dirs
from trainer_core import metrics
from trainer_core.config import pad_multiple
from trainer_core.data.text import swapped_length_features
from trainer_core.data.tta import swap_responses, tta_average


def fold_predictions(run_dir: Path, rows: pd.DataFrame, folds: list[int], *, tta: bool, device, batch_size=None,
                     log=print, cross_fitted: bool = False, overrides: dict | None = None):
    """Yield (k, (N, 3) probabilities of fold k's model) for each fold, no temperature applied. For an ensemble
    directory fold k's prediction is its members' fold-k predictions combined with the ensemble's weights (fitted on
    all OOF rows; ``cross_fitted``: fold k's own weights, fitted without fold k's labels, for in-fold soft labels)."""
    from orchestrator.runs.ensemble_weights import combine

    if is_ensemble(run_dir):
        spec = json.loads((run_dir / ENSEMBLE_FILE).read_text())
        members = [fold_predictions(m, rows, folds, tta=tta, device=device, batch_size=batch_size, log=log,
                                    cross_fitted=cross_fitted, overrides=overrides) for m in member_dirs(run_dir, spec)]
        if spec.get("length_baseline"):  # the last member: fold k's length regression, refitted on its rows
            members.append(length_baseline_predictions(run_dir, rows, folds))
        for k in folds:
            weights = spec["weights_by_fold"][str(k)] if cross_fitted else spec["weights"]
            yield k, combine([next(m)[1] for m in members], weights, spec["method"])
        return
    cfg = run_config(run_dir, overrides)
    for i, k in enumerate(folds):
        with run_compile_cache(cfg, run_dir) as cache:  # while this fold scores: ensembles interleave their members
            if cache is not None and i == 0:
                log(f"{run_dir.name}: compiled layers read from and kept in {cache}")
            p = _fold_probs(cfg, run_dir, k, rows, tta=tta, device=device, batch_size=batch_size, log=log)
        yield k, p


def _fold_probs(cfg, run_dir: Path, k: int, rows: pd.DataFrame, *, tta: bool, device, batch_size, log):
    """Fold k's model loaded, its (N, 3) probabilities of ``rows`` (TTA: averaged with the swapped rows'), released."""
    from trainer_core.data.tokenization import encode, features
    from trainer_core.fastpath import release
    from trainer_core.fold.inference import RowMeter, load_fold_model, predict_probs, resolve_eval_batch_size
    from trainer_core.model.precision import make_autocast

    model, tok, precision = load_fold_model(cfg, run_dir / f"fold={k}" / "adapter", device, batch_size)
    autocast = make_autocast(precision, device)
    ids = encode(rows, tok, cfg)
    bs = batch_size or resolve_eval_batch_size(cfg.train.eval_batch_size, model, ids, device,
                                               train_batch=cfg.train.batch_size,
                                               budget_gib=cfg.train.memory_budget_gib)
    multiple = pad_multiple(cfg.model)
    feats = features(rows, tok, cfg)
    meter = RowMeter(f"{run_dir.name} fold {k}", len(rows) * (2 if tta else 1), log)  # its clock starts now
    p = metrics.clip_probs(predict_probs(model, ids, bs, tok.pad_token_id, device, autocast, meter, multiple,
                                         feats))
    if tta:
        swapped = swap_responses(rows)
        meter.offset = len(rows)
        p_swapped = predict_probs(model, encode(swapped, tok, cfg), bs, tok.pad_token_id, device, autocast, meter,
                                  multiple, swapped_length_features(feats))  # lengths swap with the responses
        p = metrics.clip_probs(tta_average(p, p_swapped))
    log(f"{run_dir.name} fold {k}: scored {len(rows)} rows{' (+ swapped)' if tta else ''} on {device} "
        f"({precision}{', fp8 forward' if cfg.model.fp8_predict else ''}, batch {bs}): {meter.rate():.1f} rows/s "
        "after the model loaded")
    release(model)  # its hooks and swapped classes: the next fold's model is built in this process
    del model
    return p


def spread_folds(folds: list[int], devices: list[str]) -> list[tuple[str, list[int]]]:
    """(device, its folds) pairs: round robin in fold order, so five folds on two GPUs go 3 + 2 (a device gets no
    fold when there are more devices than folds; a device named twice is two processes on it)."""
    return [(d, folds[i::len(devices)]) for i, d in enumerate(devices) if folds[i::len(devices)]]


def _score_folds_on(run_dir: Path, rows: pd.DataFrame, folds: list[int], tta: bool, device: str, batch_size,
                    overrides) -> dict[int, object]:
    """One device's share (a process of its own): {fold: (N, 3) probabilities}."""
    import torch

    return dict(fold_predictions(run_dir, rows, folds, tta=tta, device=torch.device(device), batch_size=batch_size,
                                 overrides=overrides))


def fold_predictions_on(devices: list[str], run_dir: Path, rows: pd.DataFrame, folds: list[int], *, tta: bool,
                        batch_size=None, log=print, overrides: dict | None = None):
    """:func:`fold_predictions` with the folds spread over ``devices``: one process per device (spawned, so each has
    its own CUDA context) loads its folds' models one after another; yields (k, probabilities) in fold order once
    all are done. One device (or one fold): this process, as :func:`fold_predictions`."""
    shares = spread_folds(folds, devices)
    if len(shares) < 2:
        import torch

        yield from fold_predictions(run_dir, rows, folds, tta=tta, device=torch.device(devices[0]),
                                    batch_size=batch_size, log=log, overrides=overrides)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    log(f"scoring folds on {len(shares)} devices at once: " + "; ".join(f"{d}: folds {ks}" for d, ks in shares))
    done: dict[int, object] = {}
    with ProcessPoolExecutor(len(shares), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_score_folds_on, run_dir, rows, ks, tta, d, batch_size, overrides)
                   for d, ks in shares]
        for f in futures:
            done.update(f.result())
    for k in folds:
        yield k, done[k]


def length_baseline_predictions(ens_dir: Path, rows: pd.DataFrame, folds: list[int]):
    """Yield (k, (N, 3)) of the length-only baseline fitted on the ensemble's data outside fold k, as its OOF rows
    were scored (``orchestrator.reporting.baselines``)."""
    from orchestrator.reporting import baselines

    data = pd.read_parquet(ens_dir / "data.parquet")
    for k in folds:
        yield k, baselines.fit_predict(data[data["fold"] != k], rows)
