"""The small model a compile helper builds (:mod:`trainer_core.fold.warm_compile`): one or two decoder layers of every
kind the fold's model has, at the same attention parity, the fold's quantization, LoRA and fast path, random weights
and a small vocabulary. Its layers compile to the fold's own graphs: a layer's graph depends on its kind, its sizes and
the batch's shape, not on its weights nor on the model's layer count."""

from __future__ import annotations

import torch

from trainer_core.config import Config, config_from_dict

VOCAB = 512  # the replica's vocabulary: token values change no graph, and a 256k-row embedding would cost GiBs


def replica_layers(n_layers: int, frozen: int) -> list[int]:
    """Which of the model's ``n_layers`` decoder layers (the bottom ``frozen`` ones frozen) a replica keeps, in order:
    the top two (or three, for parity) frozen ones, the first adapted layer, the adapted layers after it up to four in
    all (five for parity), and the top layer. Every kind of layer is there at the same attention parity as in the
    model (Gemma-2 alternates sliding and global layers)."""
    f = min(frozen, 2 + frozen % 2)
    adapted = n_layers - frozen
    a = min(adapted, 4 + adapted % 2)
    return list(range(frozen - f, frozen)) + list(range(frozen, frozen + a - 1)) + [n_layers - 1]


def replica_architecture(cfg: Config, pad_id: int = 0) -> tuple[dict, int] | None:
    """(``model.random_config`` of the replica, its ``lora.freeze_layers``); None when the model is no larger than
    its replica, or its architecture has no layer count. Its vocabulary: :data:`VOCAB` rows, more when the padding id
    ``pad_id`` is past them (it must be a row of the embedding)."""
    arch = dict(cfg.model.random_config) if cfg.model.init == "random" else _pretrained_architecture(cfg)
    n = arch.get("num_hidden_layers")
    if not isinstance(n, int):
        return None
    keep = replica_layers(n, cfg.lora.freeze_layers)
    if len(keep) >= n:
        return None
    arch["num_hidden_layers"] = len(keep)
    if isinstance(arch.get("layer_types"), list):
        arch["layer_types"] = [arch["layer_types"][i] for i in keep]
    arch["vocab_size"] = max(VOCAB, pad_id + 1)
    return arch, sum(1 for i in keep if i < cfg.lora.freeze_layers)


def _pretrained_architecture(cfg: Config) -> dict:
    from transformers import AutoConfig

    from trainer_core.paths import resolve_model_path

    arch = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name_or_path)).to_dict()
    for key in ("quantization_config", "architectures", "_name_or_path", "transformers_version", "id2label",
                "label2id", "num_labels", "pad_token_id", "dtype", "torch_dtype", "auto_map"):
        arch.pop(key, None)
    return arch


def replica_config(cfg: Config, arch: dict, frozen: int) -> Config:
    d = cfg.to_dict()
    d["model"].update(init="random", random_config=arch)
    d["lora"]["freeze_layers"] = frozen
    d["cluster"]["compile_helpers"] = 0
    return config_from_dict(d)


def replica_ids(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Token ids inside the replica's vocabulary, padding kept as padding (the head finds a row's last token by it)."""
    out = input_ids % VOCAB
    other = (pad_id + 1) % VOCAB
    return torch.where(input_ids == pad_id, pad_id, torch.where(out == pad_id, other, out))
