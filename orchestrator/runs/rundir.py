"""A run directory: what ``run.json`` records, and claiming a directory for a run (or checking that it is this run's)
before any Ray work. Shared by ``orchestrator.cv`` and sweep trials.

A directory is only ever claimed - and with ``--restart`` only ever emptied - when it is empty or already holds this
project's ``run.json``: ``--out ~/thesis`` must not delete a thesis. The same holds for a run directory on object
storage (``orchestrator.runs.staging``), checked on the store's listing before anything is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from orchestrator.runs.data import file_sha256, load_run_data, write_data_parquet
from orchestrator.runs.staging import RunDir, open_run
from trainer_core.config import to_yaml
from trainer_core.data.soft_labels import check_soft_labels
from trainer_core.paths import atomic_write_json, atomic_write_text

RUN_KEYS = ("fingerprint", "n_folds", "data_sha256")  # what every run.json this project writes holds
INPUTS = {"fingerprint": "config", "data_sha256": "data file", "soft_labels_sha256": "train.soft_labels file",
          "extra_train_sha256": "data.extra_train_path file"}
MAX_KEYS_NAMED = 8


class RunDirError(RuntimeError):
    """The run directory belongs to a different config or data file, or is not a run directory at all."""


def run_meta(cfg, rows, folds: list[int], data_sha256: str, command: str, data_notes: dict | None = None) -> dict:
    """What ``run.json`` records: enough to refuse a run directory that belongs to another config or input file (the
    contents of ``train.soft_labels`` and ``data.extra_train_path`` by their sha256, not their paths), how rows were
    split (``fold_by``), what loading repaired (``data_notes`` of orchestrator.runs.data) and the kind and provenance
    of the soft labels a student learns from (checked here, before Ray: DataError on any problem)."""
    meta = {"experiment": cfg.experiment, "fingerprint": cfg.fingerprint(), "data_path": cfg.data.path,
            "n_folds": cfg.data.n_folds, "fold_by": cfg.data.fold_by, "data_sha256": data_sha256,
            "n_rows": int(len(rows)), "folds": folds, "command": command, **(data_notes or {})}
    meta["extra_train_sha256"] = file_sha256(cfg.data.extra_train_path) if cfg.data.extra_train_path else None
    meta["soft_labels_sha256"] = None
    if cfg.train.soft_labels:
        from trainer_core.data.soft_labels import check_provenance

        # Provenance first: "made on other folds" says more than the row-level problems such a file then has.
        provenance = check_provenance(cfg.train.soft_labels, data_sha256, cfg.data.fold_by, cfg.data.n_folds, rows)
        kind = check_soft_labels(cfg.train.soft_labels, rows, folds, cfg.data.n_folds)
        meta["soft_labels_sha256"] = file_sha256(cfg.train.soft_labels)
        meta["soft_labels"] = {"path": cfg.train.soft_labels, "kind": kind, "sha256": meta["soft_labels_sha256"],
                               "distill_weight": cfg.train.distill_weight, "provenance": provenance}
    return meta


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a ``run.json`` this project wrote (a JSON object with RUN_KEYS)."""
    try:
        meta = json.loads((Path(path) / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and all(k in meta for k in RUN_KEYS)


def check_claimable(run_dir: Path) -> None:
    """RunDirError unless ``run_dir`` is missing, empty or a run directory of this project: nothing else is ever
    written into, let alone emptied (``--restart``)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a run directory; choose another --out")
    entries = sorted(p.name for p in run_dir.iterdir())
    if entries and not is_run_dir(run_dir):
        shown = ", ".join(entries[:5]) + (f" (+{len(entries) - 5} more)" if len(entries) > 5 else "")
        raise RunDirError(f"{run_dir} is not empty and holds no run.json of this project ({shown}): refusing to use it "
                          f"as a run directory, with or without --restart; choose an empty or new --out")


def check_remote_claimable(run: RunDir) -> None:
    """:func:`check_claimable` for a run directory at a URI, on the store's listing (nothing is downloaded from a
    prefix that is not a run's)."""
    names = run.top_names()
    if names and "run.json" not in names:
        shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        raise RunDirError(f"{run.location} is not empty and holds no run.json of this project ({shown}): refusing to "
                          f"use it as a run directory, with or without --restart; choose an empty or new --out")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "random_config" and k != "compile_options":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(run_dir: Path, cfg) -> list[str]:
    """``key (old -> new)`` for every config key (cluster.* and tracking.* aside: neither changes results) that differs
    between the run's saved ``config.yaml`` and ``cfg``; keys the old file lacks (added to the project since) are
    compared with nothing and left out."""
    try:
        old = _flat(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        return []
    new = _flat(cfg.to_dict())
    return [f"{k} ({old[k]!r} -> {new[k]!r})" for k in sorted(new)
            if not k.startswith(("cluster.", "tracking.")) and k in old and old[k] != new[k]]


def _input(meta: dict, key: str):
    if key == "soft_labels_sha256" and key not in meta:  # run.json from before the top-level key
        return (meta.get("soft_labels") or {}).get("sha256")
    return meta.get(key)


def check_same_run(run_dir: Path, cfg, meta: dict) -> None:
    """RunDirError naming what differs when ``run_dir`` holds a run of another config or input file."""
    old = json.loads((Path(run_dir) / "run.json").read_text())
    changed = [k for k in INPUTS if _input(old, k) != meta.get(k)]
    if not changed:
        return
    what = " and ".join(INPUTS[k] for k in changed)
    detail = ""
    if "fingerprint" in changed:
        keys = changed_keys(run_dir, cfg)
        if keys:
            more = f" (+{len(keys) - MAX_KEYS_NAMED} more)" if len(keys) > MAX_KEYS_NAMED else ""
            detail = f" (changed: {', '.join(keys[:MAX_KEYS_NAMED])}{more})"
    raise RunDirError(f"{run_dir} holds a run with a different {what}{detail}; use another --out, or --restart to "
                      f"discard its results")


def claim_run_dir(run_dir: Path, cfg, rows, meta: dict, restart: bool) -> None:
    """Check or claim ``run_dir`` for ``meta`` (RunDirError if it is not a run directory or holds another config or
    input file), then write ``run.json`` (first: from then on the directory is recognisably a run's), the resolved
    ``config.yaml`` and ``data.parquet`` once. Shared by cv runs and sweep trials."""
    run_dir = Path(run_dir)
    check_claimable(run_dir)
    meta_path = run_dir / "run.json"
    if meta_path.exists() and not restart:
        check_same_run(run_dir, cfg, meta)
    if restart and run_dir.exists():
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, meta)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    write_data_parquet(run_dir, rows)


def prepare_run_dir(cfg, run_dir: Path | RunDir, folds: list[int], restart: bool, command: str, before_write=None):
    """Validate the data (before any Ray work), claim or check the run directory, write data.parquet once.
    ``before_write``: called after every check of the inputs and before anything is written (cv's cluster check).
    A run directory at a URI is checked on its listing, then pulled (all but checkpoints and weights) into its
    staging folder, checked and claimed there like a local one, and what was written is pushed (``--restart``
    first deletes everything under the URI, Ray's checkpoints included).

    Returns the rows with folds assigned."""
    data = load_run_data(cfg)
    meta = run_meta(cfg, data.rows, folds, data.sha256, command, data.notes)
    run = open_run(run_dir)
    if run.remote:
        check_remote_claimable(run)
        run.pull()
    try:
        check_claimable(run.local)
        if (run.local / "run.json").exists() and not restart:
            check_same_run(run.local, cfg, meta)
    except RunDirError as e:  # named as the user gave it, not as its staging folder
        raise RunDirError(str(e).replace(str(run.local), run.location)) from None
    if before_write is not None:
        before_write()
    if restart:
        run.clear()
    claim_run_dir(run.local, cfg, data.rows, meta, restart)
    run.push()
    return data.rows
