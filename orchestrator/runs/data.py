"""A run's data, in one place for ``orchestrator.cv`` and ``orchestrator.tune``: load and validate the configured file
(before Ray starts), assign folds by ``data.fold_by``, say what loading repaired, and write ``data.parquet`` - the
rows every fold worker, sweep trial and the reducer read afterwards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from trainer_core.data.arena import assign_folds, load_dataset
from trainer_core.data.train_rows import load_extra_rows
from trainer_core.paths import atomic_write


@dataclass
class RunData:
    """Validated rows with their folds, the file's SHA-256 and what ``run.json``/``sweep.json`` record about them."""

    rows: pd.DataFrame
    sha256: str
    notes: dict


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_run_data(cfg) -> RunData:
    """The configured data file (``data.path``, ``data.max_rows``), validated, with folds by ``data.fold_by``; the
    ``data.extra_train_path`` file, if any, is validated the same way.
    Raises trainer_core.data.arena.DataError naming the file, column and row ids; text UTF-8 cannot encode is repaired
    (warned about once) and listed in ``notes``."""
    data = load_dataset(cfg.data.path, max_rows=cfg.data.max_rows)
    rows = assign_folds(data.rows, cfg.data.n_folds, cfg.data.fold_by)
    load_extra_rows(cfg.data.extra_train_path)  # each fold reads it again; a bad file must stop the run here
    notes = {"fold_by": cfg.data.fold_by,
             "text_repaired": {"count": len(data.repaired_ids), "ids": data.repaired_ids,
                               "what": "text UTF-8 cannot encode (lone UTF-16 surrogates, invalid bytes) replaced by "
                                       "U+FFFD; rows kept"}}
    return RunData(rows, file_sha256(cfg.data.path), notes)


def write_data_parquet(directory: Path, rows: pd.DataFrame) -> None:
    """Write ``directory/data.parquet`` once (atomically); an existing one is the same rows and is kept."""
    path = Path(directory) / "data.parquet"
    if not path.exists():
        atomic_write(path, lambda p: rows.to_parquet(p, index=False))
