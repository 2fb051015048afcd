"""Use a finished CV run: predict new rows with every fold's model and write a Kaggle submission; export the OOF
probabilities as soft labels for distillation. No Ray; a GPU if there is one, else the CPU.

Examples::

    python -m orchestrator.predict --run runs/g9b --data test.csv --out submission.csv
    python -m orchestrator.predict --run runs/g9b --data test.csv --out submission.csv --tta
    python -m orchestrator.predict --run s3://bucket/runs/g9b --data test.csv --out submission.csv  # object storage
    python -m orchestrator.predict --run runs/g9b --soft-labels soft_labels.parquet
    python -m orchestrator.predict --run runs/g9b --soft-labels in_fold.parquet --in-fold   # for train.soft_labels
    python -m orchestrator.predict --run runs/smoke --data test.csv --out sub.csv --folds 0,1 --no-temperature
    python -m orchestrator.predict --run runs/ens --data test.csv --out submission.csv   # an orchestrator.ensemble dir
    python -m orchestrator.predict --run g9b --data test.csv --out sub.csv model.name_or_path=/kaggle/input/g2  # moved

Submission: ``id,winner_model_a,winner_model_b,winner_tie``, one row per input row, in input order. Each fold's model
scores every row (``--tta``: also with responses a and b swapped, averaged back); each fold's probabilities are
temperature-scaled with the run's global T (report.json; ``--no-temperature`` skips it), then the folds are averaged.
T is applied per fold because it was fitted on single-model OOF probabilities, which is what each fold produces.
For an ensemble directory (``orchestrator.ensemble``) fold k's prediction is every member's fold-k model's
prediction (each member without its own temperature), combined with the ensemble's weights fitted on all OOF rows,
then scaled by the ensemble's own T: the same path its OOF rows took.

In-fold soft labels (``--soft-labels PATH --in-fold``), for distillation with an honest CV: for every fold k, fold
k's model predicts fold k's own training rows (every row whose fold != k; no TTA, no temperature), written as id,
fold (= k), label, p_a, p_b, p_tie. A student run with the same data and folds given ``train.soft_labels=PATH``
uses in its fold k exactly the rows with fold == k: no model that saw fold k's labels produced them.

OOF soft labels (``--soft-labels`` alone; a student learning from them has an optimistic CV), one row per training
row: id, fold, label, p_a, p_b, p_tie (OOF, as predicted), p_a_cal, p_b_cal, p_tie_cal and temperature (cross-fitted
temperature scaling: T fitted on the other folds), plus with ``train.eval_tta`` the same for TTA: p_a_tta, p_b_tta,
p_tie_tta, p_a_tta_cal, p_b_tta_cal, p_tie_tta_cal, temperature_tta.

Both kinds carry their provenance in the parquet schema metadata (trainer_core.data.soft_labels): this run, the kind,
its data file's sha256, fold_by, n_folds, its fold assignment and the reasons its own CV is optimistic, so a student
refuses labels made on other data or folds and inherits an optimistic teacher's flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.reporting import calibration
from orchestrator.runs.overrides import PREDICT_KEYS, parse_predict_overrides, run_config
from orchestrator.runs.provenance import ENSEMBLE_FILE, is_ensemble, member_dirs, run_provenance
from orchestrator.runs.scoring import fold_predictions, fold_predictions_on
from orchestrator.runs.soft_labels import SoftLabelExportError, in_fold_soft_labels, oof_soft_labels
from orchestrator.runs.staging import on_staged_run, staged_for_predict
from orchestrator.runs.storage import is_uri
from trainer_core import metrics
from trainer_core.config import ConfigError, load_config
from trainer_core.data.arena import DataError, load_rows, parse_folds
from trainer_core.data.soft_labels import write_soft_labels
from trainer_core.model.weights import WeightsError, check_weights
from trainer_core.paths import atomic_write

SUBMISSION_COLUMNS = ["id", "winner_model_a", "winner_model_b", "winner_tie"]


class PredictError(ValueError):
    """The run directory cannot be used for prediction; the message says what is missing."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True,
                   help="a finished run (or ensemble) directory written by orchestrator.cv: a folder or a URI "
                        "(s3://bucket/prefix, gs://...: its reports and fold weights are downloaded to a temporary "
                        "folder first)")
    p.add_argument("--data", type=Path, help="rows to predict: CSV or parquet with id, prompt, response_a, response_b")
    p.add_argument("--out", type=Path, help="submission CSV to write (id,winner_model_a,winner_model_b,winner_tie)")
    p.add_argument("--tta", action="store_true",
                   help="also score each row with responses a/b swapped and average (twice the compute)")
    p.add_argument("--no-temperature", action="store_true",
                   help="do not apply the run's fitted temperature (report.json) to the probabilities")
    p.add_argument("--folds", default=None,
                   help="fold models to average, e.g. 0-4 or 0,2 (default: the folds report.json covers)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per forward pass (default: the run's train.eval_batch_size); with the run's "
                        "model.dequant_cache, the batch the dequantized weights leave room for")
    p.add_argument("--device", default="auto",
                   help="'auto' (every GPU of the machine, else the CPU), 'cpu', 'cuda', 'cuda:1', or a comma list "
                        "('cuda:0,cuda:1'); with several devices and several folds the folds are spread over them, "
                        "one process and one fold model at a time per device")
    p.add_argument("--soft-labels", type=Path, default=None, metavar="PARQUET",
                   help="write the run's OOF probabilities (plain and temperature-scaled) as soft labels")
    p.add_argument("--in-fold", action="store_true",
                   help="with --soft-labels: instead write, for every fold k, fold k's model's predictions on fold k's "
                        "own training rows (id, fold=k, p_a, p_b, p_tie): soft labels a student can use in fold k "
                        "without seeing fold k's labels (train.soft_labels); one forward pass per fold")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the run's config.yaml (every member's, for an ensemble) that leave what the "
                        "folds learned unchanged, e.g. model.name_or_path=/kaggle/input/gemma2 for a copied run "
                        f"directory; allowed: {', '.join(PREDICT_KEYS)}")
    return p


def _read_report(run_dir: Path) -> dict:
    path = run_dir / "report.json"
    if not path.exists():
        raise PredictError(f"{path}: missing; build it with `python -m orchestrator.report {run_dir}`")
    return json.loads(path.read_text())


def temperature_for(report: dict | None, tta: bool) -> tuple[float, str]:
    """(T to apply, where it came from). TTA probabilities are less confident than plain ones, so a plain T would
    over-soften them: with ``tta`` only ``temperature_tta`` (fitted on TTA OOF rows) is used."""
    if report is None:
        return 1.0, "none (--no-temperature)"
    if tta:
        if "temperature_tta" in report:
            return float(report["temperature_tta"]), "temperature_tta from report.json"
        return 1.0, "none: the run has no TTA OOF probabilities to fit one on (train the run with train.eval_tta=true)"
    return float(report["temperature"]), "temperature from report.json"


def predict_submission(run_dir: Path, rows: pd.DataFrame, folds: list[int], *, tta: bool, temperature: float,
                       device: str = "auto", batch_size: int | None = None, log=print,
                       overrides: dict | None = None) -> np.ndarray:
    """(N, 3) fold-averaged probabilities for ``rows`` (validated, any labels ignored), in row order.

    Each fold's probabilities are temperature-scaled before averaging (T was fitted on single-fold OOF rows)."""
    total = np.zeros((len(rows), 3))
    for _, p in fold_predictions_on(_devices(device), run_dir, rows, folds, tta=tta, batch_size=batch_size, log=log,
                                    overrides=overrides):
        total += calibration.apply_temperature(p, temperature)
    return metrics.clip_probs(total / len(folds))


def _devices(spec: str) -> list[str]:
    """--device as a list: ``auto`` = every GPU of the machine (else the CPU); a comma list names them."""
    import torch

    if spec == "auto":
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    return [d.strip() for d in spec.split(",") if d.strip()]


def check_base_weights(run_dir: Path, overrides: dict | None = None) -> None:
    """Before any model loads: the base model that a LoRA run's adapters load onto is found (an ensemble: each
    member's); the tokenizer is saved beside the adapters. WeightsError, one line, otherwise."""
    if is_ensemble(run_dir):
        for member in member_dirs(run_dir):
            check_base_weights(member, overrides)
        return
    run_cfg = run_config(run_dir, overrides)
    if run_cfg.lora.enabled:
        check_weights(run_cfg.model, tokenizer=False)


def _run_folds(run_dir: Path, spec: str | None, report: dict | None) -> list[int]:
    """--folds, else the folds report.json covers (those its temperature was fitted on), else run.json's. For an
    ensemble, every member must have those folds' models."""
    if is_ensemble(run_dir):
        ens = json.loads((run_dir / ENSEMBLE_FILE).read_text())
        folds = parse_folds(spec, max(ens["folds"]) + 1) if spec else list(ens["folds"])
        for member in member_dirs(run_dir, ens):
            _check_run_dir(member)
            _run_folds(member, ",".join(map(str, folds)), None)
        return folds
    meta = json.loads((run_dir / "run.json").read_text())
    if spec:
        folds = parse_folds(spec, int(meta["n_folds"]))
    else:
        folds = [f["fold"] for f in report["folds"]] if report else list(meta["folds"])
    missing = [k for k in folds if not (run_dir / f"fold={k}" / "metrics.json").exists()
               or not (run_dir / f"fold={k}" / "adapter").is_dir()]
    if missing:
        done = [k for k in range(int(meta["n_folds"])) if (run_dir / f"fold={k}" / "metrics.json").exists()
                and (run_dir / f"fold={k}" / "adapter").is_dir()]
        resume = f"`{meta['command']}`" if meta.get("command") else f"orchestrator.cv with --out {run_dir}"
        pick = f"pass --folds {','.join(map(str, done))} to use the finished ones" if done else "no fold has finished"
        raise PredictError(f"{run_dir}: fold{'s' if len(missing) > 1 else ''} {missing} not finished (no "
                           f"metrics.json or adapter/); resume the run by rerunning {resume} (the same --out), or "
                           f"{pick}")
    cfg = load_config(run_dir / "config.yaml")
    for k in folds:
        lost = _missing_weights(run_dir / f"fold={k}" / "adapter", cfg)
        if lost:
            raise PredictError(f"{lost}: missing, so fold {k}'s model cannot be loaded; retrain the fold (delete "
                               f"{lost.parent.parent} and rerun the run's orchestrator.cv command) or leave it out "
                               f"with --folds")
    return folds


def _missing_weights(adapter_dir: Path, cfg) -> Path | None:
    """The weights file a fold's saved model needs that is not there (LoRA: the adapter; otherwise the whole model in
    safetensors, one file or an index of shards), or None."""
    if cfg.lora.enabled:
        need = adapter_dir / "adapter_model.safetensors"
        return None if need.exists() else need
    if (adapter_dir / "model.safetensors.index.json").exists():
        return None
    need = adapter_dir / "model.safetensors"
    return None if need.exists() else need


def _check_run_dir(run_dir: Path) -> None:
    if is_ensemble(run_dir):
        if not (run_dir / "report.json").exists():
            raise PredictError(f"{run_dir}: ensemble without report.json; rebuild it with orchestrator.ensemble")
    elif not (run_dir / "run.json").exists() or not (run_dir / "config.yaml").exists():
        raise PredictError(f"{run_dir}: not a run directory (no run.json or config.yaml)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after flags
    if (args.data is None) != (args.out is None):
        parser.error("--data and --out go together")
    if args.data is None and args.soft_labels is None:
        parser.error("nothing to do: give --data and --out, and/or --soft-labels")
    if args.in_fold and args.soft_labels is None:
        parser.error("--in-fold goes with --soft-labels PATH")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return on_staged_run(staged_for_predict(args.run), lambda run_dir: _predict(args, run_dir))


def _predict(args, run_dir: Path) -> int:
    # Everything is checked and computed before anything is written: a bad input leaves no half-made output.
    try:
        overrides = parse_predict_overrides(args.overrides)
        _check_run_dir(run_dir)
        needs_report = args.soft_labels is not None or not args.no_temperature
        report = _read_report(run_dir) if needs_report or (run_dir / "report.json").exists() else None
        soft = oof_soft_labels(run_dir, report) if args.soft_labels is not None and not args.in_fold else None
        if args.in_fold:
            try:
                in_fold = _run_folds(run_dir, args.folds, report)
            except ValueError as e:
                raise PredictError(str(e)) from None
        if args.data is not None:
            try:
                folds = _run_folds(run_dir, args.folds, report)
            except ValueError as e:  # a bad --folds spec
                raise PredictError(str(e)) from None
            rows = load_rows(args.data, require_labels=False)
            temperature, source = temperature_for(None if args.no_temperature else report, args.tta)
        if args.data is not None or args.in_fold:
            check_base_weights(run_dir, overrides)
    except (PredictError, SoftLabelExportError, DataError, ConfigError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.in_fold:
        import torch

        soft = in_fold_soft_labels(run_dir, in_fold, partial(fold_predictions, overrides=overrides),
                                   device=torch.device(_devices(args.device)[0]),  # one model at a time
                                   batch_size=args.batch_size)
    if args.data is not None:
        print(f"predicting {len(rows)} rows of {args.data} with folds {folds}; temperature {temperature:.3f} "
              f"({source})")
        probs = predict_submission(run_dir, rows, folds, tta=args.tta, temperature=temperature, device=args.device,
                                   batch_size=args.batch_size, overrides=overrides)
        sub = pd.DataFrame({"id": rows["id"].values, "winner_model_a": probs[:, 0], "winner_model_b": probs[:, 1],
                            "winner_tie": probs[:, 2]})[SUBMISSION_COLUMNS]
    if soft is not None:
        prov = {**run_provenance(run_dir), **({"run": args.run} if is_uri(args.run) else {})}
        # What a student checks and inherits (trainer_core.data.soft_labels): this run's data, folds and honesty.
        stamp = {"teacher_run": prov["run"], "kind": "in_fold" if args.in_fold else "oof",
                 **{k: prov[k] for k in ("data_sha256", "fold_by", "n_folds", "folds_sha256")},
                 "teacher_optimistic_because": prov["optimistic_because"]}
        atomic_write(args.soft_labels, lambda p: write_soft_labels(p, soft, stamp))
        kind = "in-fold soft labels (id, fold) for folds " + str(in_fold) if args.in_fold else "OOF soft labels"
        print(f"wrote {len(soft)} {kind} to {args.soft_labels}")
    if args.data is not None:
        atomic_write(args.out, lambda p: sub.to_csv(p, index=False))
        print(f"wrote {len(sub)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
