"""A run directory: what ``run.json`` records, and claiming a directory for a run (or checking that it is this run's)
before any Ray work. Shared by ``orchestrator.cv`` and sweep trials."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from orchestrator.runs.data import file_sha256, load_run_data, write_data_parquet
from trainer_core.config import to_yaml
from trainer_core.data.soft_labels import check_soft_labels
from trainer_core.paths import atomic_write_json, atomic_write_text


class RunDirError(RuntimeError):
    """The run directory belongs to a different config or data file."""


def run_meta(cfg, rows, folds: list[int], data_sha256: str, command: str, data_notes: dict | None = None) -> dict:
    """What ``run.json`` records: enough to refuse a run directory that belongs to another config or data file, how
    rows were split (``fold_by``), what loading repaired (``data_notes`` of orchestrator.runs.data) and the kind of soft
    labels a student learns from (checked here, before Ray: DataError on any problem)."""
    meta = {"experiment": cfg.experiment, "fingerprint": cfg.fingerprint(), "data_path": cfg.data.path,
            "n_folds": cfg.data.n_folds, "fold_by": cfg.data.fold_by, "data_sha256": data_sha256,
            "n_rows": int(len(rows)), "folds": folds, "command": command, **(data_notes or {})}
    if cfg.train.soft_labels:
        kind = check_soft_labels(cfg.train.soft_labels, rows, folds, cfg.data.n_folds)
        meta["soft_labels"] = {"path": cfg.train.soft_labels, "kind": kind,
                               "sha256": file_sha256(cfg.train.soft_labels),
                               "distill_weight": cfg.train.distill_weight}
    return meta


def claim_run_dir(run_dir: Path, cfg, rows, meta: dict, restart: bool) -> None:
    """Check or claim ``run_dir`` for ``meta`` (RunDirError if it holds another config or data file), then write
    ``data.parquet`` once and the resolved ``config.yaml`` and ``run.json``. Shared by cv runs and sweep trials."""
    meta_path = run_dir / "run.json"
    if meta_path.exists() and not restart:
        old = json.loads(meta_path.read_text())
        changed = [k for k in ("fingerprint", "data_sha256") if old.get(k) != meta[k]]
        if changed:
            what = " and ".join({"fingerprint": "config", "data_sha256": "data file"}[k] for k in changed)
            raise RunDirError(f"{run_dir} holds a run with a different {what}; use another --out, or --restart to "
                              f"discard its results")
    if restart and run_dir.exists():
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_data_parquet(run_dir, rows)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    atomic_write_json(meta_path, meta)


def prepare_run_dir(cfg, run_dir: Path, folds: list[int], restart: bool, command: str):
    """Validate the data (before any Ray work), claim or check the run directory, write data.parquet once.

    Returns the rows with folds assigned."""
    data = load_run_data(cfg)
    meta = run_meta(cfg, data.rows, folds, data.sha256, command, data.notes)
    claim_run_dir(run_dir, cfg, data.rows, meta, restart)
    return data.rows
