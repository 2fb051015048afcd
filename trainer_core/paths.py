"""Model locations and atomic file writes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def resolve_model_path(name: str) -> str:
    """``'pkg:<module>/<subdir>'`` -> the folder inside that installed package; anything else is returned unchanged
    (an HF id or a local folder)."""
    if not name.startswith("pkg:"):
        return name
    module, _, sub = name[4:].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r}: Python package '{module}' is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.exists():
        raise FileNotFoundError(f"model {name!r}: {path} does not exist")
    return str(path)


def checkpoint_config(name: str) -> dict | None:
    """The checkpoint's config.json as a dict, found without a download: a local folder, a folder in an installed
    package (``pkg:``) or the Hugging Face cache; None when none of them has it."""
    try:
        folder = Path(resolve_model_path(name)).expanduser()
    except FileNotFoundError:
        return None
    path = folder / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # noqa: BLE001 - not a valid Hub id either: there is nothing to read
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    return json.loads(path.read_text())


def model_layer_count(model_cfg) -> int | None:
    """Decoder layers of the configured model without building it: ``random_config`` (with its model type's defaults)
    for ``init=random``, else the checkpoint's config.json (:func:`checkpoint_config`). None when that is unknown."""
    if model_cfg.init == "random":
        from transformers import AutoConfig

        spec = dict(model_cfg.random_config)
        config = AutoConfig.for_model(spec.pop("model_type", "gemma2"), **spec).to_dict()
    else:
        config = checkpoint_config(model_cfg.name_or_path)
        if config is None:
            return None
    for section in (config, config.get("text_config") or {}):  # multimodal checkpoints nest the text model's
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if section.get(key):
                return int(section[key])
    return None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``: readers see the old file
    or the complete new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> None:
    """Like :func:`atomic_write` for a folder (e.g. a saved adapter): built beside ``path``, then swapped in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
