"""The folds' LoRA adapters as one: checked to share a recipe, averaged, and optionally merged into the base weights.

Averaging keeps each fold's own low-rank update and takes their mean, ``mean_k(scaling_k B_k A_k)``: the weights of
the five fold models averaged (a model soup of the folds), with no cross terms ``B_j A_k`` that no fold trained. In
peft's own words this is ``add_weighted_adapter(combination_type="cat", weights=[1/n] * n)`` (A rows and B columns
concatenated, the scaling and weight folded into A, ``lora_alpha = r``). That method refuses adapters that carry a
``modules_to_save`` copy of the same module, which every sequence-classification adapter does (its ``score`` head),
so the same arithmetic is applied here to the adapters' state dicts (peft's ``load_peft_weights``), and the heads,
which are plain linear layers, are averaged. The rank of the result is n x r; merged into the base it costs nothing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

# adapter_config.json fields that must agree for the average to mean anything (one recipe, the same layers)
MUST_MATCH = ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules",
              "layers_to_transform", "modules_to_save", "rank_pattern", "alpha_pattern", "bias", "fan_in_fan_out")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterError(ValueError):
    """Adapters that cannot be averaged; one line naming the fold and the field."""


def _norm(value):
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


def check_same_recipe(adapters: dict[int, Path]) -> None:
    """Every fold's adapter_config.json agrees with the first one's on :data:`MUST_MATCH`, and their tensors have
    the same names and shapes; AdapterError naming the first difference otherwise."""
    from safetensors import safe_open  # shapes from the headers: no tensor read, no peft/bitsandbytes import yet

    configs = {k: json.loads((d / "adapter_config.json").read_text()) for k, d in adapters.items()}
    first = min(configs)
    for k, c in configs.items():
        for field in MUST_MATCH:
            if _norm(c.get(field)) != _norm(configs[first].get(field)):
                raise AdapterError(f"fold {k}'s adapter has {field}={c.get(field)!r}, fold {first}'s "
                                   f"{configs[first].get(field)!r}: --folds average needs adapters of one recipe "
                                   f"(use --folds each)")
    shapes = {}
    for k, d in adapters.items():
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            shapes[k] = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    for k, s in shapes.items():
        if s != shapes[first]:
            diff = sorted(set(s.items()) ^ set(shapes[first].items()))[0][0]
            raise AdapterError(f"fold {k}'s adapter tensor {diff} differs from fold {first}'s in name or shape: "
                               f"--folds average needs adapters of one recipe (use --folds each)")


def _scaling(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / r ** 0.5 if config.get("use_rslora") else alpha / r


def average_adapters(adapters: list[Path], out: Path) -> None:
    """Write the mean of ``adapters`` (one recipe: :func:`check_same_recipe`) as one peft adapter in ``out``."""
    from peft import LoraConfig, load_peft_weights
    from safetensors.torch import save_file

    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    weight = 1.0 / len(adapters)
    states = [load_peft_weights(str(d), device="cpu") for d in adapters]
    merged: dict[str, torch.Tensor] = {}
    for name in states[0]:
        tensors = [s[name].float() for s in states]
        if ".lora_A." in name:  # scaling and weight into A, as peft's "cat" does
            merged[name] = torch.cat([t * (weight * _scaling(config)) for t in tensors], dim=0)
        elif ".lora_B." in name:
            merged[name] = torch.cat(tensors, dim=1)
        else:  # the head (modules_to_save): a linear layer, averaged
            merged[name] = torch.stack(tensors).mean(0)
        merged[name] = merged[name].to(states[0][name].dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    rank = config["r"] * len(adapters)
    peft_config = replace(LoraConfig.from_pretrained(str(adapters[0])), r=rank, lora_alpha=rank, use_rslora=False)
    peft_config.save_pretrained(str(out))
    save_file(merged, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def merge_into_base(load_base, adapter: Path, out: Path, storage_dtype: torch.dtype) -> None:
    """The base (``load_base()``: loaded as the run trained on it, quantized or not) dequantized, the adapter added
    with peft's ``merge_and_unload``, saved as safetensors in ``storage_dtype``: W + scaling B A, one plain model."""
    from peft import PeftModel

    base = load_base()
    if getattr(base, "is_quantized", False) or getattr(base, "quantization_method", None):
        base = base.dequantize()  # the values the quantized layers compute with, so the adapter adds to those
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    model.to(storage_dtype)
    model.save_pretrained(str(out), safe_serialization=True)
