"""Where a run's (or an ensemble's) CV figure comes from: its data file, its folds and the reasons it is optimistic.

What ``orchestrator.predict`` stamps on the soft labels it writes (trainer_core.data.soft_labels), and what an
ensemble inherits from its members: a student or an ensemble is never more honest than what it learned from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from orchestrator.reporting.honesty import soft_label_reasons
from orchestrator.runs.align import RunMismatch
from trainer_core.data.soft_labels import folds_sha256

ENSEMBLE_FILE = "ensemble.json"
SHARED = ("data_sha256", "fold_by", "n_folds", "folds_sha256")  # what every member of an ensemble must share


def is_ensemble(run_dir: Path) -> bool:
    return (Path(run_dir) / ENSEMBLE_FILE).exists()


def member_dirs(ens_dir: Path, spec: dict | None = None) -> list[Path]:
    """An ensemble's member directories. ``ensemble.json`` stores them relative to the ensemble directory, so a copied
    (or moved) tree of runs and ensemble still predicts; absolute paths (ensembles written before) are read as they
    are."""
    ens_dir = Path(ens_dir)
    spec = spec if spec is not None else json.loads((ens_dir / ENSEMBLE_FILE).read_text())
    return [Path(m) if Path(m).is_absolute() else ens_dir / m for m in spec["members"]]


def run_provenance(run_dir: Path) -> dict:
    """{run, data_sha256, fold_by, n_folds, folds_sha256, optimistic_because} of a finished run or ensemble.

    A run's reasons come from its run.json (the soft labels it learned from); an ensemble's were inherited from its
    members when it was built (recomputed from the members for an ensemble written before that)."""
    run_dir = Path(run_dir)
    if is_ensemble(run_dir):
        spec = json.loads((run_dir / ENSEMBLE_FILE).read_text())
        prov = spec.get("provenance") or ensemble_provenance([run_provenance(m) for m in member_dirs(run_dir, spec)],
                                                             [str(m) for m in member_dirs(run_dir, spec)])
        return {**prov, "run": str(run_dir.resolve())}
    meta = json.loads((run_dir / "run.json").read_text())
    rows = pd.read_parquet(run_dir / "data.parquet", columns=["id", "fold"])
    return {"run": str(run_dir.resolve()), "data_sha256": meta.get("data_sha256"),
            "fold_by": meta.get("fold_by", "id"),  # runs from before data.fold_by split by id
            "n_folds": meta.get("n_folds"), "folds_sha256": folds_sha256(rows),
            "optimistic_because": soft_label_reasons(meta.get("soft_labels"))}


def ensemble_provenance(members: list[dict], names: list[str]) -> dict:
    """An ensemble's provenance from its members': their shared data, fold_by and folds (RunMismatch, one line, when
    they differ), and every member's reasons for optimism, each naming its member."""
    first = members[0]
    for prov, name in zip(members[1:], names[1:]):
        differ = [k for k in SHARED if prov.get(k) != first.get(k)]
        if differ:
            what = ", ".join(f"{k} {first.get(k)!s:.16} vs {prov.get(k)!s:.16}" for k in differ)
            raise RunMismatch(f"{names[0]} and {name} were not made on the same data and folds ({what}); an ensemble's "
                              f"members must share data.path, data.fold_by and data.n_folds")
    reasons = [f"member {name}: {r}" for prov, name in zip(members, names) for r in prov["optimistic_because"]]
    return {**{k: first.get(k) for k in SHARED}, "optimistic_because": reasons}
