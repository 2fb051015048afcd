"""One typed config tree for a CV run: defaults <- YAML (``--config``) <- dotted overrides
(``train.lr=1e-4``).

Every field has a default and a one-line doc (``doc=`` metadata, shown by ``--help-config``). Unknown keys and values
of the wrong type fail loudly at merge time; cross-field problems are collected by :func:`validate` and reported
together.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem, one per line."""


def _f(default: Any, doc: str, *, added: bool = False, **kw: Any) -> Any:
    """A documented config field. ``added=True``: a key introduced after run directories already existed, whose
    default is exactly the behaviour from before; at its default it stays out of the fingerprint, so adding it does
    not make earlier runs unresumable."""
    meta = {"doc": doc, "added": added}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class DataConfig:
    path: str = _f("", "CSV or parquet file in the Chatbot Arena schema (relative in a YAML: against its folder)")
    n_folds: int = _f(5, "number of folds; a row's fold is id % n_folds")
    max_rows: Optional[int] = _f(None, "use only the first N rows of the file (quick runs and tests); null = all rows")
    max_length: int = _f(1024, "maximum tokens per row, EOS included")
    truncation: Literal["end", "balanced"] = _f(
        "end", "'end' cuts the joined text at max_length (seed); 'balanced' shares the budget between prompt, a and b"
    )


@dataclass
class ModelConfig:
    name_or_path: str = _f("", "HF model id or local dir; 'pkg:<module>/<subdir>' = a folder in an installed package")
    tokenizer: Optional[str] = _f(None, "tokenizer id or dir (null = name_or_path); 'bytes' = built-in byte tokenizer")
    init: Literal["pretrained", "random"] = _f("pretrained", "'random' = architecture from random_config, no weights")
    random_config: dict = _f({}, "architecture kwargs (e.g. Gemma2Config fields plus model_type) used when init=random")
    quantization: Literal["nf4", "int8", "none"] = _f("none", "base-weight quantization through bitsandbytes")
    double_quant: bool = _f(True, "nf4 double quantization of the quantization constants")
    attn_implementation: Optional[str] = _f("eager", "attention kernel; eager keeps Gemma-2 logit soft-capping exactly")
    gradient_checkpointing: Literal["off", "on", "auto", "reentrant"] = _f(
        "auto", "recompute activations in backward: on/off, auto = only if the GPU's free memory demands it, "
        "reentrant = the seed's way (backward through every layer)")
    compile: Literal["off", "on", "dynamic"] = _f(
        "off", "torch.compile each decoder layer (fuses norms, GeGLU, RoPE and soft-capped attention): on = one graph "
        "for the first shape, one dynamic-shape graph from the second; dynamic = dynamic-shape graph from the start",
        added=True)
    add_eos_token: bool = _f(True, "append the tokenizer's EOS token to every row (seed)")


@dataclass
class LoraConfig:
    enabled: bool = _f(True, "train LoRA adapters (plus the score head); false = full fine-tuning")
    r: int = _f(16, "LoRA rank")
    alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    dropout: float = _f(0.05, "dropout on the LoRA input")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj"], "module names that get adapters")
    freeze_layers: int = _f(0, "adapters only on decoder layers >= this index (counted from the model's own layers)")
    bias: Literal["none", "all", "lora_only"] = _f("none", "which biases train")


@dataclass
class TrainConfig:
    epochs: float = _f(1.0, "passes over the training folds (fractions allowed)")
    max_steps: Optional[int] = _f(None, "stop after this many optimizer steps (null = epochs decide)")
    lr: float = _f(2e-4, "peak learning rate")
    warmup_steps: int = _f(20, "linear warmup steps")
    schedule: Literal["linear", "cosine", "constant"] = _f("linear", "decay after warmup")
    batch_size: int = _f(4, "rows per device per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    eval_batch_size: int = _f(4, "rows per device when predicting the held-out fold")
    optimizer: Literal["adamw_8bit", "paged_adamw_8bit", "adamw"] = _f(
        "adamw_8bit", "bitsandbytes 8-bit AdamW (paged: CUDA only) or torch AdamW")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: Optional[float] = _f(1.0, "gradient clipping norm (null = off)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU")
    seed: int = _f(42, "seed for weights of new layers, dropout and data order")
    memory_budget_gib: Optional[float] = _f(None, "cap GPU memory per fold process (emulates a smaller card)")
    group_by_length: bool = _f(True, "batch rows of similar length together to cut padding")
    log_every: int = _f(10, "optimizer steps between logged training scalars")
    checkpoint_every: Optional[int] = _f(None, "optimizer steps between resumable checkpoints (null = none)")
    eval_every: Optional[int] = _f(None, "optimizer steps between interim evaluations (sweeps stop bad trials on them)")
    interim_eval_rows: int = _f(256, "held-out rows (lowest ids first) scored by each interim evaluation")
    eval_tta: bool = _f(False, "also score held-out rows with responses a/b swapped; oof.parquet gains p_*_tta columns")


@dataclass
class ClusterConfig:
    address: Optional[str] = _f(None, "Ray address to join ('auto' = the running cluster); null starts a local one")
    gpus_per_fold: int = _f(0, "GPUs (= Ray Train workers) per fold; 0 trains on CPU workers")
    cpu_workers_per_fold: int = _f(1, "Ray Train CPU workers per fold when gpus_per_fold = 0")
    cpus_per_worker: float = _f(1.0, "CPUs reserved for each Ray Train worker")
    max_concurrent_folds: Optional[int] = _f(None, "folds training at once (null = as many as resources allow)")
    pack_folds: bool = _f(True, "a last, partial wave of folds shares all the GPUs (DDP inside each fold) "
                              "instead of leaving GPUs idle")
    max_failures: int = _f(2, "times a fold's worker group restarts from its last checkpoint after a worker dies")
    num_cpus: Optional[int] = _f(None, "CPUs for a local Ray cluster (null = all)")


@dataclass
class Config:
    experiment: str = _f("cv", "run name: the default run directory is runs/<experiment>")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not cluster placement; keys added later, at their default)."""
        d = self.to_dict()
        d.pop("cluster")
        for name, section in d.items():
            sub = getattr(self, name)
            if dataclasses.is_dataclass(sub):
                for f in dataclasses.fields(sub):
                    if f.metadata.get("added") and getattr(sub, f.name) == f.default:
                        section.pop(f.name)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# merging


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value converted to the annotated type tp, or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML reads on/off/true/false as booleans
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(prefix + n for n in names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of {key}.* keys, got {v!r}")
            _apply(cur, v, prefix=f"{key}.")
        elif isinstance(cur, dict) and isinstance(v, dict):
            setattr(obj, k, {**cur, **v})  # model.random_config.hidden_size=64 changes one entry
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.lr=1e-4'`` -> ``('train.lr', 1e-4)``; the value is read as YAML (``null``, ``[a,b]``, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def nest(dotted: dict) -> dict:
    """``{'train.lr': 1}`` -> ``{'train': {'lr': 1}}``."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def _resolve_relative_paths(raw: dict, base: Path) -> None:
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and data["path"]:
        p = Path(data["path"]).expanduser()
        if not p.is_absolute():
            data["path"] = str((base / p).resolve())


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file <- overrides. Overrides are 'a.b=v' strings or a dict of dotted keys."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections")
        _resolve_relative_paths(raw, path.resolve().parent)
        try:
            _apply(cfg, raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if overrides:
        dotted = dict(parse_override(o) for o in overrides) if isinstance(overrides, list) else dict(overrides)
        nested = nest(dotted)
        _resolve_relative_paths(nested, Path.cwd())
        _apply(cfg, nested)
    return cfg


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    _apply(cfg, d)
    return cfg


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    """A copy of ``cfg`` with dotted overrides (``{'train.lr': 1e-4}``) merged in exactly as CLI overrides are: unknown
    keys and wrong types raise ConfigError. Used by sweeps, whose trials are such overrides of one base config."""
    out = copy.deepcopy(cfg)
    _apply(out, nest(dict(overrides)))
    return out


def get_value(cfg: Config, key: str) -> Any:
    """The value at a dotted key (``'lora.r'``); KeyError if there is none."""
    node: Any = cfg
    for part in key.split("."):
        if dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(key)
    return node


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError listing every problem at once."""
    errs = []
    d, m, lo, t, c = cfg.data, cfg.model, cfg.lora, cfg.train, cfg.cluster
    if not d.path:
        errs.append("data.path: no data file given")
    if d.n_folds < 2:
        errs.append(f"data.n_folds: need at least 2 folds, got {d.n_folds}")
    if d.max_rows is not None and d.max_rows < d.n_folds:
        errs.append(f"data.max_rows: {d.max_rows} rows cannot fill {d.n_folds} folds")
    if d.max_length < 8:
        errs.append(f"data.max_length: {d.max_length} is too short to hold a row")
    if not m.name_or_path and m.init == "pretrained":
        errs.append("model.name_or_path: no model given")
    if m.init == "random" and not m.random_config:
        errs.append("model.random_config: init=random needs the architecture (model_type plus its config fields)")
    if m.init == "random" and m.tokenizer is None and not m.name_or_path:
        errs.append("model.tokenizer: init=random without name_or_path needs a tokenizer ('bytes' or a path)")
    if lo.enabled:
        if lo.r < 1:
            errs.append(f"lora.r: must be >= 1, got {lo.r}")
        if lo.alpha < 1:
            errs.append(f"lora.alpha: must be >= 1, got {lo.alpha}")
        if not 0 <= lo.dropout < 1:
            errs.append(f"lora.dropout: must be in [0, 1), got {lo.dropout}")
        if not lo.target_modules:
            errs.append("lora.target_modules: empty")
        if lo.freeze_layers < 0:
            errs.append(f"lora.freeze_layers: must be >= 0, got {lo.freeze_layers}")
    elif m.quantization != "none":
        errs.append(f"lora.enabled=false with model.quantization={m.quantization}: quantized weights cannot be trained")
    if t.epochs <= 0 and t.max_steps is None:
        errs.append(f"train.epochs: must be > 0, got {t.epochs}")
    if t.max_steps is not None and t.max_steps < 1:
        errs.append(f"train.max_steps: must be >= 1, got {t.max_steps}")
    if t.lr <= 0:
        errs.append(f"train.lr: must be > 0, got {t.lr}")
    for name in ("batch_size", "grad_accum", "eval_batch_size", "log_every"):
        if getattr(t, name) < 1:
            errs.append(f"train.{name}: must be >= 1, got {getattr(t, name)}")
    if t.warmup_steps < 0:
        errs.append(f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    if t.eval_every is not None and t.eval_every < 1:
        errs.append(f"train.eval_every: must be >= 1 or null, got {t.eval_every}")
    if t.interim_eval_rows < 1:
        errs.append(f"train.interim_eval_rows: must be >= 1, got {t.interim_eval_rows}")
    if t.checkpoint_every is not None and t.checkpoint_every < 1:
        errs.append(f"train.checkpoint_every: must be >= 1 or null, got {t.checkpoint_every}")
    if c.gpus_per_fold < 0:
        errs.append(f"cluster.gpus_per_fold: must be >= 0, got {c.gpus_per_fold}")
    if c.cpu_workers_per_fold < 1:
        errs.append(f"cluster.cpu_workers_per_fold: must be >= 1, got {c.cpu_workers_per_fold}")
    if c.cpus_per_worker <= 0:
        errs.append(f"cluster.cpus_per_worker: must be > 0, got {c.cpus_per_worker}")
    if c.max_concurrent_folds is not None and c.max_concurrent_folds < 1:
        errs.append(f"cluster.max_concurrent_folds: must be >= 1 or null, got {c.max_concurrent_folds}")
    if c.max_failures < 0:
        errs.append(f"cluster.max_failures: must be >= 0, got {c.max_failures}")
    if c.gpus_per_fold == 0 and m.quantization != "none" and t.precision == "fp16":
        errs.append("train.precision=fp16 needs a GPU; CPU folds (cluster.gpus_per_fold=0) use bf16 or fp32")
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def field_docs() -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every leaf field, for ``--help-config``."""
    out = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", f.metadata.get("doc", ""), v))

    walk(Config(), "")
    return out
