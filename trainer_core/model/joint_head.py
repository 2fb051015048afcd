"""The joint head's classifier when it is more than transformers' own linear layer: an MLP (``model.head_mlp_hidden``,
``head_mlp_activation``, ``head_mlp_dropout``) and/or the row's length features as extra inputs
(``model.length_features``, :class:`trainer_core.model.length_term.JointLengthTerm`).

:func:`install` puts a :class:`JointClassifier` where the sequence classifier keeps its head (``score`` on decoders such
as Gemma-2, applied at every position before transformers pools the last real token; ``classifier`` on BERT-style
encoders, applied to the pooled state): an MLP is applied position-wise, so pooling before or after gives the same
numbers. The lengths reach it through the model's call: ``model(input_ids=..., attention_mask=...,
length_features=(B, 6))``; a forward pre-hook on the classifier model takes them out of the call (transformers never
sees them) and leaves them in a :class:`FeatureSlot` the head reads. peft's copy of the head (``modules_to_save``)
shares that slot.

Saved as transformers saves the model (the head's tensors under its own names); a fully fine-tuned fold is loaded back
by :func:`load_full`, which rebuilds this head before reading them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer_core.model.length_term import JointLengthTerm, fit_joint

ACTIVATIONS = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "silu": torch.nn.SiLU}
HEAD_NAMES = ("score", "classifier")  # where transformers' sequence classifiers keep their head


class FeatureSlot:
    """The length features of the current call; one object shared by the head and its copies (peft deep-copies the
    head it trains)."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def __deepcopy__(self, memo) -> FeatureSlot:
        return self


class JointClassifier(torch.nn.Module):
    """``inner`` (transformers' linear head, or an MLP) plus, with a length term, that term's logits."""

    def __init__(self, inner: torch.nn.Module, length: JointLengthTerm | None, slot: FeatureSlot):
        super().__init__()
        self.inner, self.length, self.slot = inner, length, slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.length is None:
            return out
        if self.slot.value is None:
            raise ValueError("this joint model has a length term (model.length_features): call it with length_features")
        extra = self.length(self.slot.value)  # (B, 3)
        return out + (extra[:, None, :] if out.dim() == 3 else extra).to(out.dtype)


def head_name(model) -> str:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(model).__name__}: no classifier head ({' or '.join(HEAD_NAMES)}) to replace")


def custom(model_cfg) -> bool:
    """Whether the joint head needs :class:`JointClassifier`."""
    return model_cfg.head == "joint" and bool(model_cfg.head_mlp_hidden or model_cfg.length_features)


class MLP(torch.nn.Module):
    """Linear, activation, dropout, Linear (named layers: no digit in a parameter's name, which the layer-freezing
    rule of ``lora.freeze_layers`` would read as a decoder layer's index)."""

    def __init__(self, hidden: int, units: int, activation: str, dropout: float, n_labels: int):
        super().__init__()
        self.fc_in, self.act = torch.nn.Linear(hidden, units), ACTIVATIONS[activation]()
        self.drop, self.fc_out = torch.nn.Dropout(dropout), torch.nn.Linear(units, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.drop(self.act(self.fc_in(x))))


def install(model, model_cfg) -> JointClassifier:
    """Replace ``model``'s classifier head (a transformers sequence classifier, before peft wraps it) as the config
    says; returns the new head. The MLP is built in the old head's dtype and device, initialised as transformers
    initialises a linear head (normal, std ``initializer_range``, zero bias)."""
    name = head_name(model)
    old = getattr(model, name)
    weight = old.weight
    inner = old
    if model_cfg.head_mlp_hidden:
        hidden = weight.shape[1]
        inner = MLP(hidden, model_cfg.head_mlp_hidden, model_cfg.head_mlp_activation, model_cfg.head_mlp_dropout,
                    weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
        std = getattr(model.config, "initializer_range", 0.02)
        for layer in (inner.fc_in, inner.fc_out):
            torch.nn.init.normal_(layer.weight, std=std)
            torch.nn.init.zeros_(layer.bias)
    length = JointLengthTerm(weight.shape[0]).to(weight.device) if model_cfg.length_features else None
    slot = FeatureSlot()
    head = JointClassifier(inner, length, slot)
    setattr(model, name, head)

    def take_features(_module, args: tuple, kwargs: dict):
        slot.value = kwargs.pop("length_features", None)
        return args, kwargs

    model.register_forward_pre_hook(take_features, with_kwargs=True)
    return head


def fit_length(model, feats, labels) -> float:
    """Fit the joint model's length term on training rows alone (``length_term.fit_joint``), every copy of it."""
    loss = None
    for m in model.modules():
        if isinstance(m, JointClassifier) and m.length is not None:
            loss = fit_joint(m.length, feats, labels)
    if loss is None:
        raise ValueError("fit_length: the model has no joint length term")
    return loss


def load_full(model_dir: str | Path, model_cfg, dtype: torch.dtype):
    """A fully fine-tuned joint fold saved with a :class:`JointClassifier`: transformers' model from ``model_dir``, the
    head rebuilt as the config says, then its saved tensors loaded into it."""
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=dtype)
    name = head_name(model)
    head = install(model, model_cfg)
    state = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            state.update({k[len(name) + 1:]: st.get_tensor(k) for k in st.keys() if k.startswith(name + ".")})
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir}: the saved head does not match the config's (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model
