"""Loading the exported model(s) onto one device, built exactly as the project builds them for prediction.

Quantized weights load through bitsandbytes with the compute dtype of the device, then peft's k-bit preparation (as
in training: norms and the head in fp32, the embedding table kept in its load dtype and handing out fp32 rows). LoRA
adapters load onto the base with peft; several folds' adapters share one base copy and are switched per batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from arena_logs import quiet_repeated_logs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
def precision_for(device: torch.device) -> str:
    """fp32 on a CPU; bf16 on a card with native bf16 (compute capability >= 8); fp16 elsewhere (a T4: 7.5)."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def _quantization_config(quantize: str, double_quant: bool, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=dtype)


def _keep_embedding_dtype(model, dtype: torch.dtype) -> None:
    """peft's k-bit preparation upcasts the embedding table to fp32; its values came from ``dtype``, so storing it
    back is exact and casting the looked-up rows to fp32 gives the same output (half the memory on a 16 GB card)."""
    emb = model.get_input_embeddings()
    if emb is None or emb.weight.dtype != torch.float32 or dtype == torch.float32:
        return
    low = emb.weight.data.to(dtype)
    if torch.equal(low.float(), emb.weight.data):
        emb.weight.data = low
        emb.register_forward_hook(lambda _m, _i, out: out.float())


def load_classifier(path: Path, cfg: dict, quantize: str, dtype: torch.dtype, device: torch.device, pad_id: int):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kwargs = {"dtype": dtype}
    if cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = cfg["attn_implementation"]
    stored = getattr(AutoConfig.from_pretrained(str(path)), "quantization_config", None)
    if stored:  # a checkpoint stored quantized brings its own quantization; only the compute dtype is chosen here
        stored = stored if isinstance(stored, dict) else stored.to_dict()
        hf_cfg = AutoConfig.from_pretrained(str(path))
        hf_cfg.quantization_config = {**stored, "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch.")}
        hf_cfg.num_labels = 3
        kwargs["config"] = hf_cfg
    else:
        kwargs["num_labels"] = 3
    quantized = bool(stored) or quantize != "none"
    if quantized:
        quiet_repeated_logs()
        kwargs["device_map"] = {"": device}
        if not stored:
            kwargs["quantization_config"] = _quantization_config(quantize, cfg.get("double_quant", True), dtype)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
    model.config.pad_token_id = pad_id
    model.config.use_cache = False
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _keep_embedding_dtype(model, dtype)
    else:
        model.to(device)
    return model


class PairwiseModel(torch.nn.Module):
    """The project's pairwise head: a shared encoder, mean pooling, one score per sequence, a learned tie term, and
    with the run's ``model.length_features`` its length term (trainer_core/model/length_term.py): each side's score
    gets ``w . [c_own, t_own, c_own - c_other, t_own - t_other]``, the tie logit ``v . [|l_a - l_b|, l_prompt,
    (l_a + l_b) / 2]`` with ``l`` the mean of log characters and log tokens, from arena_text.length_features."""

    def __init__(self, path: Path, dtype: torch.dtype):
        from transformers import AutoModel

        super().__init__()
        self.encoder = AutoModel.from_pretrained(str(path), dtype=dtype)
        self.config = self.encoder.config
        head = torch.load(path / "pairwise_head.pt", map_location="cpu", weights_only=True)
        self.score = torch.nn.Linear(self.config.hidden_size, 1)
        self.score.load_state_dict(head["score"])
        self.tie = torch.nn.Parameter(head["tie"].clone())
        self.length = head.get("length")  # {"side": (4,), "tie": (3,)} or None

    def forward(self, input_ids, attention_mask, length_features=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        s = self.score(pooled.to(self.score.weight.dtype)).view(-1, 2)
        extra = 0.0
        if self.length is not None:
            cp, ca, cb, tp, ta, tb = length_features.float().unbind(-1)
            side = torch.stack([torch.stack([ca, ta, ca - cb, ta - tb], -1),
                                torch.stack([cb, tb, cb - ca, tb - ta], -1)], 1)
            lp, la, lb = (cp + tp) / 2, (ca + ta) / 2, (cb + tb) / 2
            sym = torch.stack([(la - lb).abs(), lp, (la + lb) / 2], -1)
            s = s.float() + (side * self.length["side"].float().to(s.device)).sum(-1)
            extra = (sym * self.length["tie"].float().to(s.device)).sum(-1, keepdim=True)
        return torch.cat([s, self.tie + s.mean(dim=1, keepdim=True) + extra], dim=1)


class Scorer:
    """Every exported model on one device: ``probs(name, input_ids, mask)`` gives (B, 3) softmax probabilities."""

    def __init__(self, root: Path, cfg: dict, device: torch.device, pad_id: int, precision: str = "auto"):
        """``precision``: auto (:func:`precision_for`), or bf16, fp16 or fp32 on any device."""
        self.device, self.precision = device, precision_for(device) if precision == "auto" else precision
        dtype = DTYPES[self.precision]
        self.names = [m["name"] for m in cfg["models"]]
        self._peft, self._models = None, {}
        if cfg.get("base"):  # LoRA adapters on one shared base
            from peft import PeftModel

            base = load_classifier(root / cfg["base"], cfg, cfg["quantize"], dtype, device, pad_id)
            for i, m in enumerate(cfg["models"]):
                if i == 0:
                    self._peft = PeftModel.from_pretrained(base, str(root / m["adapter"]), adapter_name=m["name"])
                else:
                    self._peft.load_adapter(str(root / m["adapter"]), adapter_name=m["name"])
            self._peft.eval()
        else:
            for m in cfg["models"]:
                path = root / m["model"]
                model = (PairwiseModel(path, dtype).to(device) if cfg["head"] == "pairwise"
                         else load_classifier(path, cfg, cfg["quantize"], dtype, device, pad_id))
                self._models[m["name"]] = model.eval()

    @torch.no_grad()
    def probs(self, name: str, input_ids: torch.Tensor, mask: torch.Tensor, feats=None) -> torch.Tensor:
        """``feats``: (B, 6) numpy length features of the rows, for a model with a length term."""
        if self._peft is not None:
            self._peft.set_adapter(name)
            model = self._peft
        else:
            model = self._models[name]
        ctx = (torch.autocast(self.device.type, dtype=DTYPES[self.precision]) if self.precision != "fp32"
               else torch.autocast(self.device.type, enabled=False))
        with ctx:
            extra = {} if feats is None else {"length_features": torch.from_numpy(feats).to(self.device)}
            out = model(input_ids=input_ids, attention_mask=mask, **extra)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        return torch.softmax(logits.float(), dim=-1)
