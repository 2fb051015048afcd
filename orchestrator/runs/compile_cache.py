"""Where compiled layers are kept (``cluster.compile_cache``): a fold compiles its decoder-layer graphs once, and every
later fold, worker and sweep trial that sees the same folder reads them back instead of compiling again."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.runs.storage import is_uri
from trainer_core.config import Config


def compile_cache_dir(cfg: Config, cache_root: str | Path) -> str | None:
    """``cluster.compile_cache`` as a folder: ``run`` -> ``<cache_root>/compile_cache``; ``local`` -> None (torch's
    default folder on each machine); else the configured path. A run directory on object storage (``cache_root`` a
    URI) has no folder to compile into: ``run`` then means ``local``."""
    where = cfg.cluster.compile_cache
    if where == "local" or (where == "run" and is_uri(cache_root)):
        return None
    return str((Path(cache_root) / "compile_cache").resolve() if where == "run" else Path(where).expanduser().resolve())


def use_compile_cache(path: str | None) -> None:
    """Point this process's torch.compile caches at ``path`` (before anything compiles). Inductor reads
    ``TORCHINDUCTOR_CACHE_DIR`` when it looks a graph up and keeps Triton's kernels below it; compiled graphs, the
    autograd graphs around them and tuned kernels are then read back by every later process that compiles the same
    layer graph (a fold's later folds, other workers, a sweep's trials), on any node that sees the folder."""
    if path:
        os.makedirs(path, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
        os.environ["TRITON_CACHE_DIR"] = os.path.join(path, "triton")
