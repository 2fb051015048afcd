"""The config schema: one dataclass per section (data, model, lora, train, cluster, tracking), every field with its
default and a one-line doc. Merging, validation and YAML live in :mod:`trainer_core.config`, which re-exports these
classes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem, one per line."""


def _f(default: Any, doc: str, *, added: bool = False, at_least: float | None = None, above: float | None = None,
       predict_only: bool = False, **kw: Any) -> Any:
    """A documented config field. ``added=True``: a key introduced after run directories already existed, whose
    default is exactly the behaviour from before; at its default it stays out of the fingerprint, so adding it does
    not make earlier runs unresumable. ``at_least`` / ``above``: the lower bound of a numeric key (null and words
    such as ``auto`` always pass), checked by :func:`trainer_core.config.validate.validate`. ``predict_only``: read
    only when a finished fold's model predicts (``orchestrator.predict``), so never part of the fingerprint: a run
    resumes whatever its value."""
    meta = {"doc": doc, "added": added, "predict_only": predict_only}
    if at_least is not None or above is not None:
        meta["bound"] = (">=", at_least) if at_least is not None else (">", above)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class DataConfig:
    path: str = _f("", "CSV or parquet file in the Chatbot Arena schema (relative in a YAML: against its folder)")
    n_folds: int = _f(5, "number of folds; data.fold_by decides which fold a row is in")
    fold_by: Literal["id", "row", "prompt"] = _f(
        "id", "how rows are split into folds: 'id' = id % n_folds; 'row' = row position % n_folds (the seed notebook's "
        "code); 'prompt' = scikit-learn StratifiedGroupKFold (fixed seed): stratified by label, rows sharing a prompt "
        "text in the same fold, so a repeated prompt never sits on both sides of a split (the honest CV on arena data)",
        added=True)
    max_rows: Optional[int] = _f(None, "use only the first N rows of the file (quick runs and tests); null = all rows")
    max_length: int = _f(1024, "maximum tokens per row, EOS included")
    truncation: Literal["end", "left", "balanced"] = _f(
        "end", "'end' keeps the start of the joined text, cut at max_length (seed); 'left' keeps its end (the last "
        "max_length tokens: a long response b pushes out the prompt first); 'balanced' gives prompt, a and b each a "
        "share of the budget (see data.prompt_share), each keeping its start"
    )
    extra_train_path: Optional[str] = _f(
        None, "extra rows (same schema, own ids) added to every fold's training, never held out; those whose prompt "
        "is also in the held-out fold are dropped for that fold (counted as extra_dropped_shared_prompt)", added=True)
    prompt_share: Optional[float] = _f(
        None, "truncation=balanced: the share of the token budget the prompt may take when the row is too long "
        "(e.g. 0.2); responses a and b split the rest equally, and tokens a part leaves unused go to the others. "
        "null = prompt, a and b share equally", added=True)


@dataclass
class ModelConfig:
    name_or_path: str = _f("", "HF model id or local dir; 'pkg:<module>/<subdir>' = a folder in an installed package")
    tokenizer: Optional[str] = _f(None, "tokenizer id or dir (null = name_or_path); 'bytes' = built-in byte tokenizer")
    init: Literal["pretrained", "random"] = _f("pretrained", "'random' = architecture from random_config, no weights")
    random_config: dict = _f({}, "architecture kwargs (e.g. Gemma2Config fields plus model_type) used when init=random")
    quantization: Literal["nf4", "int8", "none"] = _f("none", "base-weight quantization through bitsandbytes")
    double_quant: bool = _f(True, "nf4 double quantization of the quantization constants")
    attn_implementation: Optional[str] = _f(
        "eager", "attention kernel passed to transformers; eager keeps Gemma-2 logit soft-capping exactly; "
        "block_causal = eager's numbers, computed only for the key blocks causality allows and without copying keys "
        "and values per query head (causal models; 62.5% of the scores at 1,024 tokens; "
        "trainer_core.fastpath.attention); "
        "block_causal_triton = the same with the soft-capped softmax as one Triton kernel forward and one backward on "
        "CUDA (plain torch elsewhere)")
    gradient_checkpointing: Literal["off", "on", "auto", "reentrant"] = _f(
        "auto", "recompute activations in backward: on/off, auto = only as many trained layers as the GPU's free "
        "memory demands, reentrant = the seed's way (backward through every layer)")
    compile: Literal["off", "on", "dynamic"] = _f(
        "off", "torch.compile each decoder layer (fuses norms, GeGLU, RoPE and soft-capped attention): on = one graph "
        "for the first shape, one dynamic-shape graph from the second (with model.length_bucket: one static graph per "
        "bucket); dynamic = dynamic-shape graph from the start (fewer graphs, but each compiles far more slowly: a "
        "cold 9B fold's tenth step came at 4 min against 1.4 min with on, H100)",
        added=True)
    compile_options: dict = _f(
        {}, "torch.compile options for the compiled layers (model.compile on/dynamic), nested or dotted, with the "
        "names torch._inductor.list_options() gives, e.g. {coordinate_descent_tuning: true}; checked before anything "
        "runs. triton.multi_kernel is refused: with torch 2.11 it gave wrong gradients in these layers on an H200 "
        "(docs/PERFORMANCE.md, session 9)",
        added=True)
    persistent_reduction_max: int = _f(
        0, "compiled layers (model.compile on/dynamic): reductions over rows of a fixed length up to this many "
        "elements keep the whole row in registers (inductor's persistent reduction, read once) instead of looping "
        "over it twice; inductor itself does so only up to 64 elements when a reduction has many rows, such as the "
        "soft-capped softmax over attention's key blocks. 0 = inductor's rule; 1,024 made the Gemma-2 9B step 1.5% "
        "faster on an H200, the same sums in another order (trainer_core.fastpath.persistent_reduction)",
        added=True)
    length_bucket: int = _f(
        256, "with model.compile=on every batch is right-padded to a multiple of this many tokens and the layers are "
        "compiled for static shapes: a few fixed lengths (4 up to 1,024 tokens), each compiled once per kind of layer, "
        "instead of one graph per batch length or a dynamic-length graph (slower to compile; with torch 2.11 on an "
        "H100 it crashed until trainer_core.fastpath.compile turned inductor's tiling analysis off for it); padded "
        "positions are masked, so the numbers are the rows' own. 0 = pad to the batch's longest "
        "row (model.compile=dynamic always does)", added=True)
    precompile: bool = _f(
        True, "with model.compile=on and model.length_bucket > 0: before its first step a fold runs one forward and "
        "backward pass of each batch length its steps will use, longest first, and drops their gradients (random "
        "state kept: the fold trains exactly as without them), so every training graph compiles in one phase at the "
        "start, a length that does not fit in memory fails before any step, and the ETA is steady from the first "
        "report (trainer_core.fold.precompile)", added=True)
    dequant_cache: Literal["off", "auto", "on"] = _f(
        "off", "keep frozen nf4 weights dequantized (bf16) instead of dequantizing them at every call: the same "
        "numbers, ~17 GiB more for Gemma-2 9B; auto = as many top layers as fit beside the planned activations "
        "(orchestrator.predict: beside its batch of rows)",
        added=True)
    fp8_backward: bool = _f(
        False, "opt-in, changes numerics: in the frozen layers model.dequant_cache keeps dequantized (trained decoder "
        "layers only), the backward's activation gradient grad_y @ W runs in fp8 (row-scaled e4m3 x e4m3, "
        "torch._scaled_mm on GPUs of compute capability >= 8.9, emulated elsewhere); the forward stays exact bf16; "
        "needs quantization=nf4, dequant_cache auto/on and bf16 precision; +1 byte per cached weight",
        added=True)
    fp8_predict: bool = _f(
        False, "opt-in, changes numerics, prediction only (orchestrator.predict; never training, never a fold's own "
        "held-out rows, so the OOF log loss stays the exact model's): a loaded fold model's frozen linear layers keep "
        "e4m3 weights (a scale per output feature) and quantize each token's input at each call (torch._scaled_mm on "
        "GPUs of compute capability >= 8.9, emulated elsewhere); LoRA, norms, attention and the head stay in the "
        "compute dtype; nf4 weights are cached in fp8 (1 byte a weight), so model.dequant_cache must be auto or on; "
        "how far it moves probabilities: docs/QUALITY.md",
        added=True, predict_only=True)
    pooled_last_layer: bool = _f(
        False, "the top decoder layer computes queries, attention, o_proj, norms and MLP only at the token the head "
        "reads (keys and values still at every position): the same logits, loss and gradients up to float rounding, "
        "~2.7% less work per Gemma-2 9B step; Gemma-2 with model.head=joint and attn_implementation eager or "
        "block_causal only",
        added=True)
    add_eos_token: bool = _f(True, "append the tokenizer's EOS token to every row (seed)")
    head: Literal["joint", "pairwise"] = _f(
        "joint", "joint = one sequence (prompt, a, b) into a 3-way classifier (seed); pairwise = the shared encoder "
        "reads (prompt, a) and (prompt, b), max_length tokens each, mean-pooled and scored, Bradley-Terry logits with "
        "a learned tie term (swap-symmetric; needs lora.enabled=false)", added=True)
    length_features: bool = _f(
        False, "feed each row's untruncated lengths (log characters and log tokens of prompt, a and b, counted before "
        "truncation) into the head: pairwise = a learned term in each side's score (same weights for a and b, their "
        "difference included) and in the tie logit (still exactly symmetric); joint = extra inputs of the classifier. "
        "Fitted first on the fold's training rows alone (a logistic fit, text at zero), then trained with the model "
        "(trainer_core/model/length_term.py); swap augmentation and TTA swap them with the responses", added=True)
    head_mlp_hidden: int = _f(
        0, "model.head=joint: the classifier is an MLP with one hidden layer of this many units (Linear, "
        "head_mlp_activation, dropout head_mlp_dropout, Linear) instead of one linear layer; 0 = linear (seed)",
        added=True)
    head_mlp_activation: Literal["gelu", "relu", "tanh", "silu"] = _f(
        "gelu", "activation of the joint head's MLP (model.head_mlp_hidden > 0)", added=True)
    head_mlp_dropout: float = _f(0.1, "dropout after the activation of the joint head's MLP, in [0, 1)", added=True)


@dataclass
class LoraConfig:
    enabled: bool = _f(True, "train LoRA adapters (plus the score head); false = full fine-tuning")
    r: int = _f(16, "LoRA rank")
    alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    dropout: float = _f(0.05, "dropout on the LoRA input")
    shared_dropout: bool = _f(
        False, "draw the dropout masks of adapted siblings that read one input (q/k/v of an attention, gate/up of an "
        "MLP) from one random 62-bit integer per element, a 20-bit field each: independent masks, the same "
        "distribution with lora.dropout rounded to a multiple of 2**-20, one draw instead of three "
        "(trainer_core/fastpath/lora_dropout.py); not torch's random stream, so other masks than off", added=True)
    target_modules: list = _f(["q_proj", "k_proj", "v_proj"], "module names that get adapters")
    freeze_layers: int = _f(0, "adapters only on decoder layers >= this index (counted from the model's own layers)")
    bias: Literal["none", "all", "lora_only"] = _f("none", "which biases train")


@dataclass
class TrainConfig:
    epochs: float = _f(1.0, "passes over the training folds (fractions allowed)")
    max_steps: Optional[int] = _f(None, "stop after this many optimizer steps (null = epochs decide)", at_least=1)
    lr: float = _f(2e-4, "peak learning rate", above=0)
    warmup_steps: int = _f(20, "linear warmup steps", at_least=0)
    schedule: Literal["linear", "cosine", "constant"] = _f("linear", "decay after warmup")
    batch_size: int = _f(4, "rows per device per micro-batch", at_least=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", at_least=1)
    eval_batch_size: Union[int, Literal["auto"]] = _f(
        4, "rows per device when predicting the held-out fold; auto = on a GPU the largest power of two up to 64 "
        "whose inference activations fit in the memory free after training "
        "(trainer_core.model.memory.eval_batch_size), "
        "on the CPU train.batch_size", at_least=1)
    optimizer: Literal["adamw_8bit", "paged_adamw_8bit", "adamw"] = _f(
        "adamw_8bit", "bitsandbytes 8-bit AdamW (paged: CUDA only) or torch AdamW (32-bit states, fused on GPUs)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: Optional[float] = _f(1.0, "gradient clipping norm (null = off)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU")
    seed: int = _f(42, "seed for weights of new layers, dropout and data order")
    memory_budget_gib: Optional[float] = _f(None, "cap GPU memory per fold process (emulates a smaller card)")
    group_by_length: bool = _f(True, "batch rows of similar length together to cut padding")
    log_every: int = _f(10, "optimizer steps between logged training scalars", at_least=1)
    checkpoint_every: Optional[int] = _f(None, "optimizer steps between resumable checkpoints (null = none)",
                                         at_least=1)
    eval_every: Optional[int] = _f(None, "optimizer steps between interim evaluations (sweeps stop bad trials on "
                                   "them)", at_least=1)
    interim_eval_rows: int = _f(256, "held-out rows (lowest ids first) scored by each interim evaluation", at_least=1)
    swap_augment: bool = _f(False, "also train on every training row with responses a/b swapped (labels a<->b, ties "
                            "kept): twice the rows per epoch; a no-op for model.head=pairwise, symmetric already",
                            added=True)
    eval_tta: bool = _f(False, "also score held-out rows with responses a/b swapped; oof.parquet gains p_*_tta columns")
    soft_labels: Optional[str] = _f(
        None, "distil from a teacher: parquet/CSV with id, p_a, p_b, p_tie [, fold]; in-fold files (predict "
        "--soft-labels PATH --in-fold) keep CV honest, plain OOF ones make it optimistic (the report says so)",
        added=True)
    distill_weight: float = _f(0.5, "with train.soft_labels: loss = (1 - w) * CE(label) + w * KL(teacher || student), "
                               "w in [0, 1]", added=True)
    distill_temperature: float = _f(1.0, "with train.soft_labels: T softening teacher and student in the KL term "
                                    "(scaled by T^2)", added=True, above=0)


@dataclass
class ClusterConfig:
    address: Optional[str] = _f(None, "Ray address to join ('auto' = the running cluster); null starts a local one")
    gpus_per_fold: int = _f(0, "GPUs (= Ray Train workers) per fold; 0 trains on CPU workers", at_least=0)
    cpu_workers_per_fold: int = _f(1, "Ray Train CPU workers per fold when gpus_per_fold = 0", at_least=1)
    cpus_per_worker: float = _f(1.0, "CPUs reserved for each Ray Train worker", above=0)
    max_concurrent_folds: Optional[int] = _f(None, "folds training at once (null = as many as resources allow)",
                                             at_least=1)
    pack_folds: bool = _f(True, "a last, partial wave of folds shares all the GPUs (DDP inside each fold) "
                              "instead of leaving GPUs idle")
    rotate_folds: Optional[bool] = _f(
        None, "when folds do not divide evenly over the slots (5 folds, 4 GPUs), train every fold in pieces that take "
        "turns, resuming from checkpoints: 1.25 fold-times for 5 folds on 4 GPUs plus a restart per piece, no "
        "data-parallel split (overrides pack_folds); null = GPU folds rotate when their estimated training time is "
        "past the crossover measured against packing (orchestrator.cluster.schedule), CPU folds do not")
    max_failures: int = _f(2, "times a fold's worker group restarts from its last checkpoint after a worker dies",
                           at_least=0)
    start_attempts: Optional[int] = _f(
        10, "tries Ray Train gets to start a fold's workers (each waits up to RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, "
        "60 s by default, for the fold's resources) before the fold fails with Ray's error and the run ends, saying "
        "how to resume; null = without limit (Ray's own default: a fold whose resources never come waits forever)",
        at_least=1)
    num_cpus: Optional[int] = _f(None, "CPUs for a local Ray cluster (null = all)")
    compile_cache: str = _f(
        "run", "where compiled layers (torch.compile's inductor and Triton caches) are kept so later folds and sweep "
        "trials start warm: run = <run directory>/compile_cache (a sweep's folder for its trials; shared with every "
        "node where the run directory is; a run directory on object storage uses local), local = torch's default "
        "folder on each machine, or a folder path")
    compile_helpers: Union[int, Literal["auto"]] = _f(
        "auto", "processes that compile a fold's training graphs on a small replica of its model (one or two decoder "
        "layers of each kind, random weights) while the fold loads its model, the batch lengths shared out among "
        "them, so the fold reads its graphs back from cluster.compile_cache instead of compiling them one length after "
        "another (with model.compile=on, length buckets and model.precompile; one-GPU folds); auto = on a GPU of 40 "
        "GiB or more one per batch length, at most a quarter of the worker's CPUs, none on a CPU or a smaller card "
        "(the default: on an H200 a cold fold's first steady step came 19 s sooner, its compile phase 62 -> 10 s, "
        "docs/PERFORMANCE.md session 20); 0 = off. Never changes a result: a graph the replica did not guess compiles "
        "in the fold as before (trainer_core.fold.warm_compile)",
        at_least=0)


@dataclass
class TrackingConfig:
    mlflow: Optional[str] = _f(
        None, "MLflow 3 tracking URI (http://host:5000, sqlite:///mlflow.db, databricks): one parent run per CV with "
        "the resolved config as parameters, one child run per fold with per-step loss, lr and samples/s, the final "
        "metrics and report.html/report.json/oof.parquet as artifacts; a sweep logs one run per trial. null = off. "
        "Needs pip install .[tracking]; an unreachable server costs one warning line, not the run")
    mlflow_experiment: Optional[str] = _f(None, "MLflow experiment name (null = the config's experiment)")
    wandb: Literal["off", "offline", "online"] = _f(
        "off", "Weights & Biases: offline = runs written under <run directory>/wandb (upload later with `wandb sync`), "
        "online = streamed (needs `wandb login`); one run per fold and one for the CV, grouped by the run's name")
    wandb_project: Optional[str] = _f(None, "W&B project (null = the config's experiment)")
    wandb_entity: Optional[str] = _f(None, "W&B entity: user or team (null = your default entity)")


@dataclass
class Config:
    experiment: str = _f("cv", "run name: the default run directory is runs/<experiment>")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not cluster placement nor experiment tracking; keys added later, at
        their default; prediction-only keys)."""
        d = self.to_dict()
        d.pop("cluster")
        d.pop("tracking")
        for name, section in d.items():
            sub = getattr(self, name)
            if dataclasses.is_dataclass(sub):
                for f in dataclasses.fields(sub):
                    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                    if f.metadata.get("predict_only") or (f.metadata.get("added") and getattr(sub, f.name) == default):
                        section.pop(f.name)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
