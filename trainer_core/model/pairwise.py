"""The pairwise head (``model.head: pairwise``): one shared encoder reads (prompt, response a) and (prompt, response b)
as two sequences, a linear layer scores each, and the three class logits follow Davidson's Bradley-Terry model with
ties: ``[s_a, s_b, nu + (s_a + s_b) / 2]``, so p(a) : p(b) = exp(s_a - s_b) and p(tie) = nu * sqrt(p(a) p(b)) up to
normalisation. Swapping the responses swaps p(a) and p(b) exactly: the model has no position bias to learn away, and
every training row teaches one scoring function twice instead of two positions once.

Batches hold the two sequences of each row next to each other: (2B, T) input ids, rows 2i and 2i + 1 being row i's
(prompt, a) and (prompt, b) (``trainer_core.data.batching.collate`` lays them out so); the output is (B, 3) logits.

With ``model.length_features`` each side's score also gets a learned term of the row's untruncated lengths, the same
weights for a and b, and the tie logit one of lengths that do not change when a and b swap
(``trainer_core.model.length_term``): still exactly symmetric. ``forward`` then needs ``length_features`` (B, 6).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from trainer_core.model.length_term import PairwiseLengthTerm, fit_pairwise

HEAD_FILE = "pairwise_head.pt"


class PairwisePreferenceModel(torch.nn.Module):
    """A shared encoder, mean pooling over real tokens, a linear score per sequence and a learned tie term (plus, with
    ``length_features``, a learned length term in each side's score and in the tie logit)."""

    def __init__(self, encoder, length_features: bool = False):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # layer counting and pad ids read the encoder's config
        hidden = encoder.config.hidden_size
        self.score = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.score.weight, std=0.02)  # small scores at first: the first steps predict the prior
        torch.nn.init.zeros_(self.score.bias)
        self.tie = torch.nn.Parameter(torch.tensor(-2.0))  # log nu; ties are rare in preference data
        self.length = PairwiseLengthTerm() if length_features else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                length_features: torch.Tensor | None = None) -> SequenceClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (2B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # the mean the sentence encoder was trained on
        s = self.score(pooled.to(self.score.weight.dtype)).view(-1, 2)  # (B, 2): s_a, s_b
        extra = 0.0
        if self.length is not None:
            if length_features is None:
                raise ValueError("this pairwise model has a length term (model.length_features): pass length_features")
            side, extra = self.length(length_features)
            s = s.float() + side
        tie = self.tie + s.mean(dim=1, keepdim=True) + extra
        return SequenceClassifierOutput(logits=torch.cat([s, tie], dim=1))

    def fit_length(self, feats, labels) -> float:
        """Fit the length and tie terms on training rows alone, text scores at zero (``length_term.fit_pairwise``)."""
        return fit_pairwise(self.length, self.tie, feats, labels)

    def save_pretrained(self, out_dir: str) -> None:
        """The encoder in its own format plus the score layer, tie term (and length term) in ``pairwise_head.pt``."""
        self.encoder.save_pretrained(out_dir)
        head = {"score": self.score.state_dict(), "tie": self.tie.detach().cpu()}
        if self.length is not None:
            head["length"] = {k: v.detach().cpu() for k, v in self.length.state_dict().items()}
        torch.save(head, Path(out_dir) / HEAD_FILE)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> PairwisePreferenceModel:
        """A model saved by :meth:`save_pretrained`."""
        from transformers import AutoModel

        head = torch.load(Path(model_dir) / HEAD_FILE, map_location="cpu")
        model = cls(AutoModel.from_pretrained(str(model_dir), dtype=dtype), length_features="length" in head)
        model.score.load_state_dict(head["score"])
        if model.length is not None:
            model.length.load_state_dict(head["length"])
        with torch.no_grad():
            model.tie.copy_(head["tie"])
        return model


def build_pairwise(path: str, dtype: torch.dtype, attn_implementation: str | None,
                   length_features: bool = False) -> PairwisePreferenceModel:
    """A fresh pairwise model on the pretrained encoder at ``path`` (its own LM or classification head dropped)."""
    from transformers import AutoModel

    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    encoder = AutoModel.from_pretrained(path, **kwargs)
    for name, param in encoder.named_parameters():
        if name.startswith("pooler."):  # BERT's [CLS] pooler is unused here; frozen so no optimizer or DDP expects it
            param.requires_grad_(False)
    return PairwisePreferenceModel(encoder, length_features)
