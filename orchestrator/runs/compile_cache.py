"""Where compiled layers are kept (``cluster.compile_cache``): a fold compiles its decoder-layer graphs once, and every
later fold, worker and sweep trial that sees the same folder reads them back instead of compiling again."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def run_compile_cache(cfg: Config, run_dir: str | Path) -> Iterator[str | None]:
    """While a process scores rows with a finished run's fold models (``orchestrator.predict``, soft labels): its
    compile caches where the run's folds kept theirs (``cluster.compile_cache``, which predict may override: ``local``
    = torch's own folder, as ``TORCHINDUCTOR_CACHE_DIR`` says), so the inference graphs the folds compiled for their
    held-out rows are read back instead of compiled again. A graph is keyed alike in a Ray worker and a plain process
    (``trainer_core.fastpath.compile.stable_cache_keys``), and a loaded fold model is the fold's own, fast path
    included (``load_fold_model``). The run's own folder is used only where it exists and can be written (a read-only
    copy of a run, such as a Kaggle input, is left alone). Yields the folder, or None where nothing changed; the
    process's settings are back as they were afterwards."""
    path = None if cfg.model.compile == "off" else compile_cache_dir(cfg, run_dir)
    if path is None or (cfg.cluster.compile_cache == "run" and not (os.path.isdir(path) and os.access(path, os.W_OK))):
        yield None
        return
    before = {key: os.environ.get(key) for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    use_compile_cache(path)
    try:
        yield path
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
