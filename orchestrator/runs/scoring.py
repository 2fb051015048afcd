"""A finished run's fold models scoring new rows: one model at a time, each released before the next loads; an
ensemble's members combined with its weights. No Ray: ``orchestrator.predict`` and the soft-label export use it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from orchestrator.runs.overrides import run_config
from orchestrator.runs.provenance import ENSEMBLE_FILE, is_ensemble, member_dirs
from trainer_core import metrics
from trainer_core.config import pad_multiple
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
    from trainer_core.data.tokenization import encode, features
    from trainer_core.fastpath import release
    from trainer_core.fold.inference import RowMeter, load_fold_model, predict_probs, resolve_eval_batch_size
    from trainer_core.model.precision import make_autocast

    cfg = run_config(run_dir, overrides)
    for k in folds:
        model, tok, precision = load_fold_model(cfg, run_dir / f"fold={k}" / "adapter", device)
        autocast = make_autocast(precision, device)
        ids = encode(rows, tok, cfg)
        bs = batch_size or resolve_eval_batch_size(cfg.train.eval_batch_size, model, ids, device,
                                                   train_batch=cfg.train.batch_size)
        meter = RowMeter(f"{run_dir.name} fold {k}", len(rows) * (2 if tta else 1), log)
        multiple = pad_multiple(cfg.model)
        p = metrics.clip_probs(predict_probs(model, ids, bs, tok.pad_token_id, device, autocast, meter, multiple,
                                             features(rows, tok, cfg)))
        if tta:
            swapped = swap_responses(rows)  # length features swapped with the responses
            meter.offset = len(rows)
            p_swapped = predict_probs(model, encode(swapped, tok, cfg), bs, tok.pad_token_id, device, autocast, meter,
                                      multiple, features(swapped, tok, cfg))
            p = metrics.clip_probs(tta_average(p, p_swapped))
        log(f"{run_dir.name} fold {k}: scored {len(rows)} rows{' (+ swapped)' if tta else ''} on {device} "
            f"({precision}, batch {bs}): {meter.rate():.1f} rows/s after the model loaded")
        release(model)  # its hooks and swapped classes: the next fold's model is built in this process
        del model
        yield k, p


def length_baseline_predictions(ens_dir: Path, rows: pd.DataFrame, folds: list[int]):
    """Yield (k, (N, 3)) of the length-only baseline fitted on the ensemble's data outside fold k, as its OOF rows
    were scored (``orchestrator.reporting.baselines``)."""
    from orchestrator.reporting import baselines

    data = pd.read_parquet(ens_dir / "data.parquet")
    for k in folds:
        yield k, baselines.fit_predict(data[data["fold"] != k], rows)
