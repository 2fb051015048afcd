"""Model building: any ``AutoModelForSequenceClassification`` backbone, Gemma-2 first-class (4-bit/8-bit QLoRA).

This is the plain model: weights loaded (quantized if configured), LoRA (or the layers fine-tuned in full), the head.
Every speed change after that - recomputation, compilation, the dequantized-weight cache, the pooled last layer,
shared dropout draws, fp8 - is :func:`trainer_core.fastpath.apply`, a floor above; so is registering attention
implementations transformers must know before loading (:func:`trainer_core.fastpath.prepare_load`)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from trainer_core.config import BLOCK_CAUSAL, LoraConfig, ModelConfig
from trainer_core.logs import quiet_repeated_logs
from trainer_core.model import joint_head
from trainer_core.model.precision import DTYPES, keep_embedding_dtype, random_weights_dtype
from trainer_core.model.weights import check_quantization
from trainer_core.paths import atomic_write_dir, resolve_model_path

log = logging.getLogger(__name__)

NUM_LABELS = 3


def _quantization_config(model_cfg: ModelConfig, compute_dtype: torch.dtype):
    if model_cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=model_cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def random_weights_dir(model_cfg: ModelConfig, pad_token_id: int, seed: int, dtype: torch.dtype) -> Path:
    """Save a randomly initialised model of ``model_cfg.random_config``'s architecture once per machine and return its
    folder. Quantization happens only through ``from_pretrained``, hence the save; the cache key covers everything
    that changes the weights, so concurrent folds on one machine share one copy."""
    spec = dict(model_cfg.random_config)
    key = hashlib.sha256(json.dumps([spec, pad_token_id, seed, str(dtype)], sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("TRAINER_CORE_CACHE", Path(tempfile.gettempdir()) / "trainer_core_random"))
    out = root / key
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # folds sharing a machine build it once; the others wait, then reuse it
        if not (out / "config.json").exists():
            _save_random_model(spec, pad_token_id, seed, dtype, out)
    return out


def _save_random_model(spec: dict, pad_token_id: int, seed: int, dtype: torch.dtype, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model_type = spec.pop("model_type", "gemma2")
    cfg = AutoConfig.for_model(model_type, **spec, num_labels=NUM_LABELS, pad_token_id=pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Weight init draws from the global RNG; seeding it here would move it for whatever the caller builds next (the
    # LoRA adapters), so a model's adapters would depend on whether this cache was warm. fork_rng restores it.
    cuda_devices = list(range(torch.cuda.device_count())) if device == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        with torch.device(device):  # a 9B model is built directly on the GPU in bf16: minutes faster than on the CPU
            model = AutoModelForSequenceClassification.from_config(cfg, dtype=dtype)
    atomic_write_dir(out, lambda tmp, m=model: _save_weights_and_config(m, tmp))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def _save_weights_and_config(model, out: Path) -> None:
    """config.json plus model.safetensors, written by whichever process builds the cache. Not ``save_pretrained``:
    inside a torch.distributed group it writes config.json on rank 0 only, so a cache built by rank 1 of a DDP fold
    (the first to take the lock on a cold machine) was a folder without config.json, unloadable by every rank."""
    from safetensors.torch import save_model

    model.config.save_pretrained(str(out))
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})


def _prequantized_config(path: str, model_cfg: ModelConfig, compute_dtype: torch.dtype):
    """For a checkpoint stored quantized (``quantization_config`` in its config.json): its config, checked against
    ``model.quantization`` (a conflict raises WeightsError; transformers would silently use the stored one), with the
    compute dtype of ``train.precision`` (a load-time choice, not part of the stored weights). Else None."""
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(path)
    stored = getattr(hf_cfg, "quantization_config", None)
    if not stored:
        return None
    stored = stored if isinstance(stored, dict) else stored.to_dict()
    check_quantization(model_cfg, stored, model_cfg.name_or_path)
    hf_cfg.quantization_config = {**stored, "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch.")}
    hf_cfg.num_labels = NUM_LABELS
    return hf_cfg


def decoder_layer_count(model) -> int:
    cfg = model.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise ValueError(f"cannot tell how many layers {type(model).__name__} has")


def build_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, *, pad_token_id: int, precision: str,
                device: torch.device, seed: int = 0):
    """The plain sequence classifier (3 labels; ``model.head=pairwise``: see ``trainer_core.model.pairwise``; an MLP
    head or length inputs: ``trainer_core.model.joint_head``):
    quantized if configured, LoRA on the configured modules of layers >= ``freeze_layers`` (or full fine-tuning of
    those layers with LoRA disabled), on ``device``. No recomputation and nothing compiled: the fast path
    (:func:`trainer_core.fastpath.apply`) comes after, with the memory plan."""
    from transformers import AutoModelForSequenceClassification

    quiet_repeated_logs()  # bitsandbytes' int8 matmuls log a line at every call: kept to one
    dtype = DTYPES[precision]
    if model_cfg.init == "random":
        path = str(random_weights_dir(model_cfg, pad_token_id, seed, random_weights_dtype(precision, device)))
    else:
        path = resolve_model_path(model_cfg.name_or_path)
    quant = _quantization_config(model_cfg, dtype)
    stored = _prequantized_config(path, model_cfg, dtype) if model_cfg.init == "pretrained" else None
    # with config= given, from_pretrained takes no config fields (num_labels) as keywords: the config carries them
    kwargs = dict(config=stored) if stored is not None else dict(num_labels=NUM_LABELS)
    kwargs["dtype"] = dtype
    if model_cfg.attn_implementation:
        _check_attention_known(model_cfg.attn_implementation)
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if quant is not None:
        # Inside a Ray Train worker the device is already set; never "auto" (spreads layers over other GPUs).
        kwargs["device_map"] = {"": device}
        if stored is None:  # quantized while loading; a pre-quantized checkpoint brings its own quantization_config
            kwargs["quantization_config"] = quant
    if model_cfg.head == "pairwise":
        from trainer_core.model.pairwise import build_pairwise

        model = build_pairwise(path, kwargs["dtype"], model_cfg.attn_implementation, model_cfg.length_features)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        if joint_head.custom(model_cfg):  # an MLP and/or length inputs: before peft copies the head it trains
            joint_head.install(model, model_cfg)
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    if quant is None:
        model.to(device)
    n_layers = decoder_layer_count(model)

    if quant is not None:
        from peft import prepare_model_for_kbit_training

        # peft's default would turn on reentrant checkpointing plus input grads, which sends the backward pass through
        # every frozen layer; recomputation is the fast path's choice (trainer_core.fastpath.recompute).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        # ...and it upcasts the embedding table to fp32 (3.7 GB for Gemma-2 9B): stored back in its load dtype, with
        # fp32 rows handed out, it gives the same numbers
        keep_embedding_dtype(model, dtype)

    if lora_cfg.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        if lora_cfg.freeze_layers >= n_layers:
            raise ValueError(f"lora.freeze_layers={lora_cfg.freeze_layers} leaves no layer to adapt: the model has "
                             f"{n_layers} layers")
        peft_cfg = PeftLoraConfig(
            task_type="SEQ_CLS",
            r=lora_cfg.r,
            lora_alpha=lora_cfg.alpha,
            lora_dropout=lora_cfg.dropout,
            bias=lora_cfg.bias,
            target_modules=list(lora_cfg.target_modules),
            layers_to_transform=list(range(lora_cfg.freeze_layers, n_layers)) if lora_cfg.freeze_layers else None,
        )
        model = get_peft_model(model, peft_cfg)
    else:
        _freeze_bottom(model, lora_cfg.freeze_layers, n_layers)
    return model


def fit_length_term(model, feats, labels) -> float:
    """``model.length_features``: fit the head's length term on the training rows ``feats`` (N, 6) and ``labels``
    alone, the text's contribution at zero (``trainer_core.model.length_term``); returns the fit's log loss."""
    if model_is_pairwise(model):
        return model.fit_length(feats, labels)
    return joint_head.fit_length(model, feats, labels)


def model_is_pairwise(model) -> bool:
    from trainer_core.model.pairwise import PairwisePreferenceModel

    return isinstance(model, PairwisePreferenceModel)


def _check_attention_known(name: str) -> None:
    """The project's own attention names are registered by ``trainer_core.fastpath.prepare_load``; without that call
    transformers would refuse them deep inside loading, with its list of names."""
    if name not in BLOCK_CAUSAL:
        return
    from transformers import AttentionInterface

    if name not in AttentionInterface():
        raise ValueError(f"model.attn_implementation={name} is not registered: call "
                         "trainer_core.fastpath.prepare_load(cfg.model) before build_model")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList as long as the layer count)."""
    n = decoder_layer_count(model)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def _freeze_bottom(model, freeze_layers: int, n_layers: int) -> None:
    """Full fine-tuning of layers >= freeze_layers and the head; embeddings and lower layers stay fixed."""
    if freeze_layers <= 0:
        return
    if freeze_layers >= n_layers:
        raise ValueError(f"lora.freeze_layers={freeze_layers} freezes all {n_layers} layers")
    import re

    layer_re = re.compile(r"\.(\d+)\.")
    for name, p in model.named_parameters():
        m = layer_re.search(name)
        if "embed" in name or (m and int(m.group(1)) < freeze_layers):
            p.requires_grad_(False)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Only the trained tensors (adapters and head): a few MB where the full model is many GB. Read from the parameters,
    not ``model.state_dict()``: that would serialise every quantized layer, and bitsandbytes' state-dict hook on the
    CPU rewrites a 4-bit weight's layout in place, so the rank that saves a checkpoint would predict differently."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params or not params[k].requires_grad]
    if unknown:
        raise ValueError(f"checkpoint has tensors the model does not train: {sorted(unknown)[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
