"""The recipe a report carries: which model (and Hub revision), which data file (sha256, rows), the config keys that
differ from the defaults, when the run started and ended, on which GPUs, and every fold's training-loss curve.

Two halves. :func:`stamp_session` runs in ``orchestrator.cv`` once Ray is up and appends what only the running
command knows (start time, the cluster's CPUs and GPUs, the model's Hub revision) to ``<run>/sessions.json``: a file
of its own, because ``run.json`` is rewritten by every invocation and a resumed run has several sessions. The folds
add their card and end time to ``metrics.json`` (``trainer_core.fold.state``). :func:`read_recipe` reads all of it
back from files only, with the loss curves from the TensorBoard events the folds write, so the reducer stays
rerunnable on a copied run directory."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

SESSIONS_FILE = "sessions.json"
LOSS_TAG = "train_loss"  # the scalar trainer_core.fold.loop logs every train.log_every steps


def model_revision(name: str) -> str | None:
    """The Hub commit of ``name``'s cached snapshot (the folder a run loads), a package's version for
    ``pkg:<module>/...``, else None (a local folder has no revision). Never downloads."""
    if name.startswith("pkg:"):
        from importlib import metadata

        module = name[4:].split("/", 1)[0]
        dists = metadata.packages_distributions().get(module, [])
        return f"{dists[0]} {metadata.version(dists[0])}" if dists else None
    if not name or Path(name).expanduser().exists():
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True)).name  # .../snapshots/<commit>
    except Exception:  # noqa: BLE001 - not a cached Hub id: no revision to state
        return None


def stamp_session(run_dir: Path, cfg, resources: dict, folds: list[int]) -> None:
    """Append this invocation (start time, the cluster's CPU/GPU totals, the folds it trains, the model's revision)
    to ``<run_dir>/sessions.json``. Called by ``orchestrator.cv`` once Ray is up; never fails a run over it."""
    from trainer_core.paths import atomic_write_json

    path = Path(run_dir) / SESSIONS_FILE
    try:
        sessions = json.loads(path.read_text()) if path.exists() else []
    except ValueError:
        sessions = []
    sessions.append({"started_at": time.time(), "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0),
                     "folds": list(folds), "model_revision": model_revision(cfg.model.name_or_path)})
    atomic_write_json(path, sessions)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("random_config", "compile_options"):  # mappings that are one value
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def shown(value) -> str:
    """A config value as a person types it (JSON for lists and mappings, not Python's repr)."""
    return value if isinstance(value, str) else json.dumps(value)


def non_default_keys(config: dict) -> dict:
    """Dotted keys of a resolved config (``config.yaml``) whose value differs from the schema's default."""
    from trainer_core.config import Config

    defaults = _flat(dataclasses.asdict(Config()))
    return {k: v for k, v in _flat(config).items() if k not in defaults or defaults[k] != v}


def loss_curve(tb_dir: Path) -> list[list[float]]:
    """[[step, train_loss], ...] from a fold's TensorBoard events (every event file in the folder: a resumed fold
    writes another; a step logged twice keeps its last value). [] when there are none."""
    if not tb_dir.is_dir():
        return []
    from orchestrator.reporting.events import scalars

    points = scalars(tb_dir, LOSS_TAG)
    if points is None:
        return []
    by_step = {e.step: e.value for e in sorted(points, key=lambda e: e.wall_time)}
    return [[int(s), float(v)] for s, v in sorted(by_step.items())]


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def read_recipe(run_dir: Path, folds: list[int], fold_metrics: list[dict], meta: dict,
                location: str | None = None) -> dict:
    """The recipe section of report.json, from ``run.json`` (``meta``), ``config.yaml``, ``sessions.json``, the folds'
    ``metrics.json`` (``fold_metrics``) and their TensorBoard events. Keys whose source is absent (a run from before
    this file existed) are None. ``location``: the run directory as the report names it (a URI), when ``run_dir`` is a
    local staging copy."""
    run_dir = Path(run_dir)
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except OSError:
        config = {}
    try:
        sessions = json.loads((run_dir / SESSIONS_FILE).read_text())
    except (OSError, ValueError):
        sessions = []
    model = config.get("model") or {}
    start = sessions[0]["started_at"] if sessions else None
    ends = [m["finished_at"] for m in fold_metrics if m.get("finished_at") is not None]
    end = max(ends) if ends and len(ends) == len(fold_metrics) else None
    gpu_names = sorted({m["gpu_name"] for m in fold_metrics if m.get("gpu_name")})
    tb = run_dir / "tensorboard"
    return {
        "model": model.get("name_or_path"),
        "model_init": model.get("init"),
        "model_revision": next((s.get("model_revision") for s in reversed(sessions) if s.get("model_revision")), None),
        "tokenizer": model.get("tokenizer"),
        "data_path": meta.get("data_path"),
        "data_sha256": meta.get("data_sha256"),
        "data_rows": meta.get("n_rows"),
        "non_default": non_default_keys(config) if config else {},
        "started_at": _iso(start),
        "ended_at": _iso(end),
        "wall_seconds": end - start if start is not None and end is not None and end >= start else None,
        "sessions": len(sessions),
        "gpu_type": ", ".join(gpu_names) or None,
        "gpus_per_fold": max((m.get("world_size", 1) for m in fold_metrics if m.get("gpu_name")), default=0),
        "cluster_gpus": sessions[-1].get("gpus") if sessions else None,
        "tensorboard": f"tensorboard --logdir {location.rstrip('/') + '/tensorboard' if location else tb}",
        "loss_curves": {str(k): loss_curve(tb / f"fold={k}") for k in folds},
    }


def recipe_rows(recipe: dict) -> list[tuple[str, str]]:
    """(label, text) lines of the recipe, shared by report.md and report.html."""
    def hms(s: float) -> str:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m{int(s % 60):02d}s"

    rev = f" (revision {recipe['model_revision']})" if recipe.get("model_revision") else ""
    model = recipe.get("model") or "-"
    if recipe.get("model_init") == "random":
        model = "random weights (model.init=random, architecture in model.random_config)" + (
            f" shaped as {recipe['model']}" if recipe.get("model") else "")
    rows = [("model", f"{model}{rev}")]
    if recipe.get("tokenizer"):
        rows.append(("tokenizer", recipe["tokenizer"]))
    rows.append(("data", f"{recipe.get('data_path') or '-'}, {recipe.get('data_rows') or '-'} rows, sha256 "
                         f"{recipe.get('data_sha256') or '-'}"))
    if recipe.get("started_at"):
        wall = f", wall {hms(recipe['wall_seconds'])}" if recipe.get("wall_seconds") is not None else ""
        resumed = f" ({recipe['sessions']} sessions: resumed)" if recipe.get("sessions", 0) > 1 else ""
        rows.append(("time", f"{recipe['started_at']} to {recipe.get('ended_at') or '-'}{wall}{resumed}"))
    if recipe.get("gpu_type"):
        cluster = f" ({recipe['cluster_gpus']:g} in the cluster)" if recipe.get("cluster_gpus") else ""
        rows.append(("GPUs", f"{recipe['gpu_type']}, {recipe['gpus_per_fold']} per fold{cluster}"))
    else:
        rows.append(("GPUs", "none (CPU workers)"))
    rows.append(("TensorBoard", recipe["tensorboard"]))
    return rows
