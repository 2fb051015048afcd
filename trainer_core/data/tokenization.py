"""Building the configured tokenizer, and the rows encoded as a run's config says: the text rules themselves (the
seed's template, truncation, bounded tokenization, the pairwise layout) live in trainer_core.data.text, the one
source that the standalone predictor of an export copies; this module reads their settings from the config.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from trainer_core.config import DataConfig, ModelConfig
from trainer_core.data import text
from trainer_core.data.text import SEGMENT_PREFIXES, ensure_pad_token, format_text, part_budgets
from trainer_core.data.text import special_wrap as _special_wrap
from trainer_core.paths import resolve_model_path

# the text names callers (and tests) have always imported from here, besides this module's own
__all__ = ["SEGMENT_PREFIXES", "_special_wrap", "build_byte_tokenizer", "build_tokenizer", "encode", "encode_pairs",
           "encode_rows", "ensure_pad_token", "features", "format_text", "part_budgets", "save_tokenizer"]


def build_byte_tokenizer():
    """A byte-level tokenizer that needs no download: ids 0-3 are <pad>, <eos>, <bos>, <unk>; each UTF-8 byte one token.

    Used with randomly initialised models (tests, GPU benchmarks) where no real vocabulary exists offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def build_tokenizer(model_cfg: ModelConfig):
    """The configured tokenizer, with a pad token (EOS when it has none) and right padding."""
    from transformers import AutoTokenizer

    name = model_cfg.tokenizer or model_cfg.name_or_path
    if name == "bytes":
        tok = build_byte_tokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    return ensure_pad_token(tok)


def save_tokenizer(tok, out_dir: str | Path) -> None:
    tok.save_pretrained(str(out_dir))


def encode_rows(df: pd.DataFrame, tok, data_cfg: DataConfig, add_eos: bool) -> list[list[int]]:
    """One id list per row, at most ``data.max_length`` tokens, truncated as ``data.truncation`` says
    (:func:`trainer_core.data.text.encode_rows`)."""
    return text.encode_rows(df, tok, data_cfg.max_length, data_cfg.truncation, data_cfg.prompt_share, add_eos)


def encode_pairs(df: pd.DataFrame, tok, data_cfg: DataConfig, add_eos: bool) -> list[tuple[list[int], list[int]]]:
    """model.head=pairwise: (prompt + response a, prompt + response b) id lists per row
    (:func:`trainer_core.data.text.encode_pairs`)."""
    return text.encode_pairs(df, tok, data_cfg.max_length, add_eos)


def features(df: pd.DataFrame, tok, cfg):
    """(N, 6) untruncated length features of the rows (:func:`trainer_core.data.text.length_features`) with
    ``model.length_features``, else None."""
    return text.length_features(df, tok) if cfg.model.length_features else None


def encode(df: pd.DataFrame, tok, cfg) -> list:
    """The rows as the configured head reads them: one id list per row (joint) or a pair of them (pairwise)."""
    return text.encode(df, tok, cfg.model.head, cfg.data.max_length, cfg.data.truncation, cfg.data.prompt_share,
                       cfg.model.add_eos_token)
