"""Cross-field checks of a merged config: :func:`validate` reports every problem at once, before Ray starts."""

from __future__ import annotations

import dataclasses

from trainer_core.config.schema import (
    Config,
    ConfigError,
    ModelConfig,
)

# model.attn_implementation values of trainer_core.fastpath.attention
BLOCK_CAUSAL = ("block_causal", "block_causal_triton")
PERSISTENT_REDUCTION_CAP = 16384  # model.persistent_reduction_max: longer rows would not fit in registers


def compile_options(m: ModelConfig) -> dict:
    """``model.compile_options`` as torch.compile takes them: nested mappings joined into dotted names
    (``{'triton': {'cudagraphs': False}}`` -> ``{'triton.cudagraphs': False}``); a later entry wins over an earlier one
    of the same name (a command-line override over the YAML)."""
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{name}.")
            else:
                flat[name] = value
    walk(m.compile_options, "")
    return flat


def _noop() -> None:
    """What :func:`_torch_compile_refusal` hands torch.compile: never called, so nothing compiles."""


def _torch_compile_refusal(name: str, value) -> str | None:
    """Why torch.compile refuses the option ``name: value``, or None. torch.compile checks its options' names and
    types when called, before anything compiles (the public way to ask; the same check a fold's first layer meets)."""
    import torch  # only here: the options torch.compile knows come from torch

    try:
        torch.compile(_noop, options={name: value})
    except RuntimeError as e:
        return str(e).split(", known options are")[0]  # the full list of names follows: too long for a config error
    return None


def _compile_option_errors(m: ModelConfig) -> list[str]:
    """Problems with ``model.compile_options``, found before anything starts (torch itself only checks the names when
    the first layer compiles, inside a fold)."""
    options = compile_options(m)
    if not options:
        return []
    errs = [f"model.compile_options.{k}: expected a number, string or true/false, got {v!r}"
            for k, v in options.items() if not isinstance(v, (bool, int, float, str))]
    if options.get("triton.multi_kernel"):
        errs.append("model.compile_options.triton.multi_kernel: not allowed, it computes wrong gradients in these "
                    "compiled layers (docs/PERFORMANCE.md); remove it, and set model.persistent_reduction_max=1024 "
                    "for the persistent softmax rows it would choose")
    if m.compile == "off":
        return errs  # inert without compiled layers (inert_keys): torch.compile never sees them
    unknown = []
    for name, value in options.items():
        if not isinstance(value, (bool, int, float, str)):
            continue  # reported above
        refusal = _torch_compile_refusal(name, value)
        if refusal and refusal.startswith("Unexpected optimization option"):
            unknown.append(name)
        elif refusal:
            errs.append(f"model.compile_options.{name}: torch.compile refuses {value!r}: {refusal}")
    if unknown:
        errs.append(f"model.compile_options: torch.compile (inductor) has no option(s) {', '.join(sorted(unknown))}; "
                    "fix the name (torch._inductor.list_options() prints the known ones)")
    return errs


def pad_multiple(m: ModelConfig) -> int:
    """Tokens a batch's length is rounded up to: ``model.length_bucket`` for layers compiled with static shapes
    (``model.compile=on``), else 0 (the batch's longest row)."""
    return m.length_bucket if m.compile == "on" and m.length_bucket > 0 else 0


def _bound_errors(cfg: Config) -> list[str]:
    """Every key below the lower bound its schema field declares (``_f(..., at_least=... / above=...)``); null, and
    words such as ``auto``, pass."""
    errs = []
    for section in dataclasses.fields(cfg):
        node = getattr(cfg, section.name)
        for f in dataclasses.fields(node) if dataclasses.is_dataclass(node) else ():
            value, bound = getattr(node, f.name), f.metadata.get("bound")
            if bound is None or isinstance(value, (str, bool)) or value is None:
                continue
            op, limit = bound
            if value <= limit if op == ">" else value < limit:
                other = " or null" if str(f.type).startswith("Optional") else ""
                errs.append(f"{section.name}.{f.name}: must be {op} {limit}{other}, got {value}")
    return errs


def inert_keys(cfg: Config) -> list[str]:
    """Keys set to something that does nothing under this config, for one console note: with ``model.compile=off``
    (the eager escape hatch, on any shipped config) the options of compiled layers stay unused."""
    m = cfg.model
    if m.compile != "off":
        return []
    keys = [f"model.persistent_reduction_max={m.persistent_reduction_max}"] if m.persistent_reduction_max else []
    return keys + [f"model.compile_options.{k}" for k in compile_options(m)]


def inert_note(cfg: Config) -> str | None:
    """The console's one line about :func:`inert_keys`, or None."""
    keys = inert_keys(cfg)
    return (f"note: model.compile=off: {', '.join(keys)} only act on compiled layers and are ignored"
            if keys else None)


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError listing every problem at once."""
    errs = []
    d, m, lo, t, c = cfg.data, cfg.model, cfg.lora, cfg.train, cfg.cluster
    # experiment names the default run directory runs/<experiment>: a path in it (../..) would point that at a
    # parent folder, which --restart empties.
    if not cfg.experiment or cfg.experiment in (".", "..") or any(ch in cfg.experiment for ch in "/\\"):
        errs.append(f"experiment: {cfg.experiment!r} must be a plain name (no '/', '\\' and not '.' or '..'): it names "
                    f"the run directory runs/<experiment>; use --out for a path")
    if not d.path:
        errs.append("data.path: no data file given")
    if d.n_folds < 2:
        errs.append(f"data.n_folds: need at least 2 folds, got {d.n_folds}")
    if d.max_rows is not None and d.max_rows < d.n_folds:
        errs.append(f"data.max_rows: {d.max_rows} rows cannot fill {d.n_folds} folds")
    if d.max_length < 8:
        errs.append(f"data.max_length: {d.max_length} is too short to hold a row")
    if d.prompt_share is not None:
        if not 0 < d.prompt_share < 1:
            errs.append(f"data.prompt_share: must be in (0, 1) or null, got {d.prompt_share}")
        if d.truncation != "balanced":
            errs.append(f"data.prompt_share: applies to data.truncation=balanced only (got {d.truncation!r})")
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
    if m.fp8_backward and (m.quantization != "nf4" or m.dequant_cache == "off" or t.precision not in ("bf16", "auto")):
        errs.append(f"model.fp8_backward=true runs the backward through the bf16 weights model.dequant_cache keeps: it "
                    f"needs model.quantization=nf4 (got {m.quantization}), model.dequant_cache auto or on (got "
                    f"{m.dequant_cache}) and train.precision bf16 or auto (got {t.precision})")
    if m.fp8_predict and m.quantization == "nf4" and m.dequant_cache == "off":
        errs.append("model.fp8_predict=true keeps frozen nf4 weights in fp8 through model.dequant_cache: set it to "
                    "auto or on (got off)")
    errs.extend(_compile_option_errors(m))
    if m.length_bucket < 0:
        errs.append(f"model.length_bucket: must be >= 0 (tokens; 0 = no bucketing), got {m.length_bucket}")
    if not 0 <= m.persistent_reduction_max <= PERSISTENT_REDUCTION_CAP:
        errs.append(f"model.persistent_reduction_max: must be in [0, {PERSISTENT_REDUCTION_CAP}] (elements a row keeps "
                    f"in registers), got {m.persistent_reduction_max}")
    # a pretrained model that is not a Gemma-2 is refused when built (trainer_core.fastpath.last_layer)
    if m.pooled_last_layer:
        needs = [f"model.head=joint (got {m.head})"] if m.head != "joint" else []
        if m.attn_implementation not in ("eager", *BLOCK_CAUSAL):
            needs.append(f"model.attn_implementation eager or block_causal (got {m.attn_implementation})")
        if m.init == "random" and m.random_config.get("model_type", "gemma2") != "gemma2":
            needs.append(f"a Gemma-2 (got random_config.model_type={m.random_config['model_type']})")
        if needs:
            errs.append("model.pooled_last_layer=true computes the top layer only at the last non-pad token, the one "
                        "the joint head reads, from eager attention's mask on a Gemma-2: it needs " + ", ".join(needs))
    if m.attn_implementation in BLOCK_CAUSAL and m.head != "joint":
        errs.append(f"model.attn_implementation={m.attn_implementation} skips the keys a causal decoder masks; "
                    f"model.head={m.head} mean-pools every position of an encoder: use model.head=joint or another "
                    "attention")
    if m.head == "pairwise" and lo.enabled:
        errs.append("model.head=pairwise trains the whole encoder: set lora.enabled=false (adapters are not supported "
                    "with this head yet)")
    if m.head_mlp_hidden < 0:
        errs.append(f"model.head_mlp_hidden: must be >= 0 (units; 0 = a linear classifier), got {m.head_mlp_hidden}")
    if not 0 <= m.head_mlp_dropout < 1:
        errs.append(f"model.head_mlp_dropout: must be in [0, 1), got {m.head_mlp_dropout}")
    if m.head_mlp_hidden and m.head != "joint":
        errs.append(f"model.head_mlp_hidden={m.head_mlp_hidden}: an MLP classifier is a joint-head option; "
                    f"model.head={m.head} scores each sequence with one linear layer")
    if t.epochs <= 0 and t.max_steps is None:
        errs.append(f"train.epochs: must be > 0, got {t.epochs}")
    if not 0 <= t.distill_weight <= 1:
        errs.append(f"train.distill_weight: must be in [0, 1], got {t.distill_weight}")
    errs.extend(_bound_errors(cfg))
    if c.gpus_per_fold == 0 and m.quantization != "none" and t.precision == "fp16":
        errs.append("train.precision=fp16 needs a GPU; CPU folds (cluster.gpus_per_fold=0) use bf16 or fp32")
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
