"""Tokenizer building and the seed's text template.

Row text (seed): ``"<prompt>: " + P + "\\n\\n<response_a>: " + A + "\\n\\n<response_b>: " + B``, then the tokenizer's
own special tokens plus EOS (seed: ``add_eos_token=True``), truncated to ``max_length`` tokens.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from trainer_core.config import DataConfig, ModelConfig
from trainer_core.paths import resolve_model_path

SEGMENT_PREFIXES = ("<prompt>: ", "\n\n<response_a>: ", "\n\n<response_b>: ")
PAIR_PREFIXES = ("<prompt>: ", "\n\n<response>: ")  # model.head=pairwise: one sequence per response


def format_text(prompt: str, response_a: str, response_b: str) -> str:
    """The seed's template for one row."""
    return SEGMENT_PREFIXES[0] + prompt + SEGMENT_PREFIXES[1] + response_a + SEGMENT_PREFIXES[2] + response_b


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


def ensure_pad_token(tok):
    """Right padding, and a pad token (EOS, else UNK, when the tokenizer has none): training and prediction both
    pad this way, so the pooled last real token is found the same way."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


def _special_wrap(tok) -> tuple[list[int], list[int]]:
    """(prefix, suffix) special-token ids that the tokenizer puts around a single segment."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []  # pragma: no cover - tokenizers that rewrite content when adding specials


def _balanced_budget(lengths: list[int], budget: int) -> list[int]:
    """Water-filling: each segment gets an equal share of the budget, unused share goes to the longer ones."""
    take = [0] * len(lengths)
    remaining = budget
    while remaining > 0:
        open_ = [i for i, n in enumerate(lengths) if take[i] < n]
        if not open_:
            break
        share = max(1, remaining // len(open_))
        for i in open_:
            add = min(lengths[i] - take[i], share, remaining)
            take[i] += add
            remaining -= add
    return take


def encode_rows(df: pd.DataFrame, tok, data_cfg: DataConfig, add_eos: bool) -> list[list[int]]:
    """Token ids for every row of ``df`` (columns prompt/response_a/response_b), at most ``max_length`` each."""
    prefix, suffix = _special_wrap(tok)
    eos = [tok.eos_token_id] if add_eos and tok.eos_token_id is not None and suffix[-1:] != [tok.eos_token_id] else []
    budget = data_cfg.max_length - len(prefix) - len(suffix) - len(eos)
    if budget < 3:
        raise ValueError(f"data.max_length={data_cfg.max_length} leaves no room for text after special tokens")
    if data_cfg.truncation == "end":
        texts = [format_text(p, a, b) for p, a, b in zip(df["prompt"], df["response_a"], df["response_b"])]
        content = [ids[:budget] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    else:
        parts = [
            tok([pre + t for t in df[col]], add_special_tokens=False)["input_ids"]
            for pre, col in zip(SEGMENT_PREFIXES, ("prompt", "response_a", "response_b"))
        ]
        content = []
        for segs in zip(*parts):
            take = _balanced_budget([len(s) for s in segs], budget)
            content.append([t for s, n in zip(segs, take) for t in s[:n]])
    return [prefix + c + suffix + eos for c in content]


def encode_pairs(df: pd.DataFrame, tok, data_cfg: DataConfig, add_eos: bool) -> list[tuple[list[int], list[int]]]:
    """model.head=pairwise: for every row, the token ids of (prompt, response a) and (prompt, response b), each at most
    ``max_length``. The prompt and the response share the budget fairly (water-filling); a cut prompt keeps its end,
    the turn the response answers, and a cut response keeps its start."""
    prefix, suffix = _special_wrap(tok)
    eos = [tok.eos_token_id] if add_eos and tok.eos_token_id is not None and suffix[-1:] != [tok.eos_token_id] else []
    budget = data_cfg.max_length - len(prefix) - len(suffix) - len(eos)
    if budget < 3:
        raise ValueError(f"data.max_length={data_cfg.max_length} leaves no room for text after special tokens")
    tag = tok(PAIR_PREFIXES[0], add_special_tokens=False)["input_ids"]
    prompts = tok(list(df["prompt"]), add_special_tokens=False)["input_ids"]
    sides = [tok([PAIR_PREFIXES[1] + t for t in df[col]], add_special_tokens=False)["input_ids"]
             for col in ("response_a", "response_b")]

    def one(p: list[int], r: list[int]) -> list[int]:
        p_take, r_take = _balanced_budget([len(tag) + len(p), len(r)], budget)
        kept = p[len(p) - max(0, p_take - len(tag)):]  # the prompt's last tokens
        return prefix + tag[:p_take] + kept + r[:r_take] + suffix + eos

    return [(one(p, a), one(p, b)) for p, a, b in zip(prompts, *sides)]


def encode(df: pd.DataFrame, tok, cfg) -> list:
    """The rows as the configured head reads them: one id list per row (joint) or a pair of them (pairwise)."""
    if cfg.model.head == "pairwise":
        return encode_pairs(df, tok, cfg.data, cfg.model.add_eos_token)
    return encode_rows(df, tok, cfg.data, cfg.model.add_eos_token)


def save_tokenizer(tok, out_dir: str | Path) -> None:
    tok.save_pretrained(str(out_dir))
