"""Run directories as inputs to the workbench commands (compare, ensemble): their OOF rows, checked to line up.

Two runs can only be compared or combined row by row when they predicted the same ids, with each id held out in the
same fold and carrying the same label; anything else is refused with one line naming both directories and the ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.reporting.reducer import OOF_COLUMNS, PROB_COLUMNS


class RunMismatch(ValueError):
    """Run directories that cannot be lined up row by row (or are not finished runs); the message is one line."""


def _ids(ids, limit: int = 5) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:limit])) + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def load_oof(run_dir: str | Path) -> pd.DataFrame:
    """The combined OOF rows of a finished run (or ensemble) directory, sorted by id."""
    run_dir = Path(run_dir)
    path = run_dir / "oof.parquet"
    if not path.exists() or not (run_dir / "report.json").exists():
        raise RunMismatch(f"{run_dir}: not a finished run (no oof.parquet or report.json); build them with "
                          f"`python -m orchestrator.report {run_dir}`")
    oof = pd.read_parquet(path)
    missing = [c for c in OOF_COLUMNS if c not in oof.columns]
    if missing:
        raise RunMismatch(f"{path}: missing columns {', '.join(missing)}")
    p = oof[PROB_COLUMNS].to_numpy()
    if not np.isfinite(p).all() or not np.allclose(p.sum(1), 1.0, atol=1e-6):
        raise RunMismatch(f"{path}: p_a, p_b, p_tie are not finite rows summing to 1")
    return oof.sort_values("id").reset_index(drop=True)


def read_report(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())


def check_aligned(named: list[tuple[str, pd.DataFrame]]) -> None:
    """Raise RunMismatch unless every OOF frame covers the same ids with the same fold and label per id."""
    ref_name, ref = named[0]
    for name, oof in named[1:]:
        only_ref, only_other = set(ref["id"]) - set(oof["id"]), set(oof["id"]) - set(ref["id"])
        if only_ref or only_other:
            parts = [f"ids {_ids(s)} only in {n}" for s, n in ((only_ref, ref_name), (only_other, name)) if s]
            raise RunMismatch(f"{ref_name} and {name} cover different rows: {'; '.join(parts)}")
        for col, what in (("fold", "folds"), ("label", "labels")):
            differ = ref["id"][ref[col].to_numpy() != oof[col].to_numpy()]
            if len(differ):
                raise RunMismatch(f"{ref_name} and {name} give ids {_ids(differ)} different {what}; runs must use the "
                                  f"same data and data.n_folds")
