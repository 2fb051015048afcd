"""Where the model and tokenizer come from, checked before any Ray work: a local folder, a folder inside an installed
package (``pkg:``), the Hugging Face cache, or the Hub when it can be reached (then downloaded into the cache once).
Also what a checkpoint is already quantized to: a pre-quantized checkpoint (``quantization_config`` in its
config.json, e.g. ``unsloth/gemma-2-9b-it-bnb-4bit``) trains only with the ``model.quantization`` it was stored in.

Offline mode is the user's choice: ``HF_HUB_OFFLINE=1`` (read by ``huggingface_hub``) keeps this module to the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from trainer_core.config.schema import Config, ModelConfig
from trainer_core.paths import model_layer_count, resolve_model_path

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")
# What a download fetches: configs, safetensors weights and tokenizer files (not .bin/.gguf/.onnx copies of the
# weights that many repositories also hold).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "spiece.model", "*.txt", "*.jinja"]
REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class WeightsError(ValueError):
    """The model or tokenizer cannot be used; the message is one line saying what is missing and how to get it."""


@dataclass
class Located:
    name: str  # as configured
    path: Path  # the local folder that holds it
    source: str  # "local folder", "installed package", "Hugging Face cache" or "Hugging Face Hub"


def check_weights(model_cfg: ModelConfig, *, tokenizer: bool = True) -> list[Located]:
    """Locate everything ``model_cfg`` loads (downloading from the Hub into its cache when allowed and needed) and
    check a pre-quantized checkpoint against ``model.quantization``; raises :class:`WeightsError` (one line, every
    problem) before anything is written. ``tokenizer=False``: the tokenizer is not needed (predict reads the one
    saved beside each fold's adapter)."""
    needs: dict[str, set[str]] = {}  # name -> {"model", "tokenizer"}
    keys: dict[str, str] = {}
    if model_cfg.init == "pretrained":
        needs.setdefault(model_cfg.name_or_path, set()).add("model")
        keys[model_cfg.name_or_path] = "model.name_or_path"
    tok_name = model_cfg.tokenizer or model_cfg.name_or_path
    if tokenizer and tok_name != "bytes":
        needs.setdefault(tok_name, set()).add("tokenizer")
        keys.setdefault(tok_name, "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path")
    found, errors = [], []
    for name, what in needs.items():
        try:
            found.append(locate(name, what, keys[name]))
        except WeightsError as e:
            errors.append(str(e))
    if errors:
        raise WeightsError("; ".join(errors))
    for loc in found:
        if model_cfg.init == "pretrained" and loc.name == model_cfg.name_or_path:
            check_quantization(model_cfg, read_quantization_config(loc.path), loc.name)
    return found


def locate(name: str, what: set[str], key: str) -> Located:
    """The local folder holding ``what`` ({"model", "tokenizer"}) of ``name``; WeightsError naming ``key`` if none."""
    if name.startswith("pkg:"):
        try:
            return _complete(Located(name, Path(resolve_model_path(name)), "installed package"), what, key)
        except FileNotFoundError as e:
            raise WeightsError(f"{key}: {e}") from None
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _complete(Located(name, folder, "local folder"), what, key)
    if not REPO_ID.match(name) or name.startswith((".", "~")):
        raise WeightsError(f"{key}: folder {name} does not exist (and it is not a Hugging Face model id)")
    return _from_hub(name, what, key)


def _missing(folder: Path, what: set[str]) -> str | None:
    """What ``folder`` lacks of ``what``, in words; None if nothing."""
    if "model" in what:
        if not (folder / "config.json").exists():
            return "no config.json"
        if not _has_weights(folder):
            return "no model weights (model.safetensors or its shards)"
    if "tokenizer" in what and not any((folder / f).exists() for f in TOKENIZER_FILES):
        return f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])})"
    return None


def _has_weights(folder: Path) -> bool:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).exists():
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            return all((folder / s).exists() for s in shards)
    return (folder / "model.safetensors").exists() or (folder / "pytorch_model.bin").exists()


def _complete(loc: Located, what: set[str], key: str) -> Located:
    gap = _missing(loc.path, what)
    if gap:
        raise WeightsError(f"{key}: {loc.name} ({loc.source} {loc.path}) has {gap}")
    return loc


def _from_hub(name: str, what: set[str], key: str) -> Located:
    """The cached snapshot of Hub repository ``name`` if complete, else a download when the Hub can be reached."""
    from huggingface_hub import constants, snapshot_download

    cache = constants.HF_HUB_CACHE
    get = f"`hf download {name}`"
    try:
        snap = Path(snapshot_download(name, local_files_only=True))
        if _missing(snap, what) is None:
            return Located(name, snap, "Hugging Face cache")
        gap = f"is only partly in the Hugging Face cache ({_missing(snap, what)})"
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not cached
        gap = "is not in the Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise WeightsError(f"{key}: {name} {gap} ({cache}) and HF_HUB_OFFLINE is set: download it first with {get} "
                           f"(or point {key} at a local folder)")
    log.info("%s: %s %s: fetching it from the Hugging Face Hub into %s (once; later runs use the cache)", key, name,
             gap, cache)
    try:
        snap = Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - every failure becomes one line that says what to do
        raise WeightsError(f"{key}: {name} {gap} ({cache}) and {_hub_failure(e)}: download it where the Hub can be "
                           f"reached with {get} and copy that cache here (or set HF_HOME), or point {key} at a "
                           f"local folder") from None
    return _complete(Located(name, snap, "Hugging Face Hub"), what, key)


def _hub_failure(e: Exception) -> str:
    kind = type(e).__name__
    if kind == "GatedRepoError":
        return "the repository is gated (accept its licence on huggingface.co, then `hf auth login`)"
    if kind == "RepositoryNotFoundError":
        return "the Hub has no such repository (or it is private: `hf auth login`)"
    cause = e.__cause__ or e.__context__
    why = f"{type(cause).__name__}" if cause is not None else kind
    return f"the Hub cannot be reached ({why})"


def read_quantization_config(folder: Path) -> dict | None:
    """The ``quantization_config`` stored in a checkpoint's config.json (None: not pre-quantized)."""
    path = Path(folder) / "config.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("quantization_config") or None


def stored_quantization(qc: dict) -> str:
    """'nf4', 'fp4', 'int8' or the quantization method's name, from a config.json ``quantization_config``."""
    if qc.get("quant_method", "bitsandbytes") != "bitsandbytes":
        return str(qc.get("quant_method"))
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        return str(qc.get("bnb_4bit_quant_type", "fp4"))
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return "int8"
    return "none"


def check_quantization(model_cfg: ModelConfig, qc: dict | None, name: str) -> None:
    """A pre-quantized checkpoint loads only as it was stored: refuse a ``model.quantization`` (or nf4 double
    quantization) that differs, rather than let transformers silently use the stored one."""
    if not qc:
        return
    stored = stored_quantization(qc)
    if stored == "none":
        return
    want = model_cfg.quantization
    where = f"{name} is already quantized to {stored} (quantization_config in its config.json)"
    if stored not in ("nf4", "int8"):
        raise WeightsError(f"model.name_or_path: {where}, which this project does not train: use a bitsandbytes nf4 "
                           f"or int8 checkpoint, or an unquantized one")
    if want != stored:
        raise WeightsError(f"model.quantization={want} conflicts with the checkpoint: {where}; set "
                           f"model.quantization={stored}, or use an unquantized checkpoint (e.g. google/gemma-2-9b-it)"
                           f" for model.quantization={want}")
    stored_dq = bool(qc.get("bnb_4bit_use_double_quant", False))
    if stored == "nf4" and stored_dq != model_cfg.double_quant:
        raise WeightsError(f"model.double_quant={str(model_cfg.double_quant).lower()} conflicts with the checkpoint: "
                           f"{name} is stored {'with' if stored_dq else 'without'} nf4 double quantization; set "
                           f"model.double_quant={str(stored_dq).lower()}")


@functools.lru_cache(maxsize=8)
def _layer_count(model_json: str) -> int | None:
    return model_layer_count(ModelConfig(**json.loads(model_json)))


def model_fit_problem(cfg: Config) -> str | None:
    """Why ``cfg`` cannot train on its model (``lora.freeze_layers`` at or past the model's decoder layer count), or
    None - also when the layer count is unknown here (a Hub checkpoint not downloaded yet)."""
    n_layers = _layer_count(json.dumps(dataclasses.asdict(cfg.model), sort_keys=True))
    if n_layers is not None and cfg.lora.freeze_layers >= n_layers:
        source = "its random_config" if cfg.model.init == "random" else f"{cfg.model.name_or_path}'s config.json"
        return (f"lora.freeze_layers={cfg.lora.freeze_layers} leaves no layer to train: the model has {n_layers} "
                f"decoder layers ({source})")
    return None
