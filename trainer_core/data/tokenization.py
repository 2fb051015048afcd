"""Tokenizer building and the seed's text template.

Row text (seed): ``"<prompt>: " + P + "\\n\\n<response_a>: " + A + "\\n\\n<response_b>: " + B``, then the tokenizer's
own special tokens plus EOS (seed: ``add_eos_token=True``), truncated to ``max_length`` tokens (``data.truncation``:
keep the start, the end, or a share of each part). A text is never tokenized much past what its budget can keep: a
200,000-word response costs about as much as a short one.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from trainer_core.config import DataConfig, ModelConfig
from trainer_core.paths import resolve_model_path

SEGMENT_PREFIXES = ("<prompt>: ", "\n\n<response_a>: ", "\n\n<response_b>: ")
PAIR_PREFIXES = ("<prompt>: ", "\n\n<response>: ")  # model.head=pairwise: one sequence per response
CUT_MARGIN_TOKENS = 16  # tokens past the budget tokenized before a cut text is trusted (see tokenize_bounded)
FIRST_CUT_CHARS_PER_TOKEN = 8  # first character bound per token needed; doubled for rows where it was too few
ENCODE_BLOCK = 1024  # rows formatted at a time
TOKENIZE_CHUNK = 64  # texts per tokenizer call: a fast tokenizer keeps offsets and token strings for every token


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


def part_budgets(lengths: list[int], budget: int, prompt_share: float | None = None) -> list[int]:
    """Tokens kept of (prompt, response a, response b) for ``truncation=balanced``. Without ``prompt_share`` the three
    share equally (water-filling); with it the prompt takes at most that share while the responses need the room,
    a and b split the rest equally, and whatever the responses leave unused goes back to the prompt."""
    if prompt_share is None:
        return _balanced_budget(lengths, budget)
    prompt = min(lengths[0], int(budget * prompt_share))
    a, b = _balanced_budget(lengths[1:], budget - prompt)
    return [min(lengths[0], budget - a - b), a, b]


def tokenize_bounded(tok, texts: list[str], need: int, from_end: bool = False) -> list[list[int]]:
    """The first ``need`` token ids of each text (the last, with ``from_end``; all of them when it has fewer) - the
    same as tokenizing the whole text and cutting - without tokenizing a huge text whole: a text is cut to a character
    bound first (at whitespace, so no word is cut in two), and the bound doubles for the rows whose cut gave fewer
    than ``need + CUT_MARGIN_TOKENS`` tokens. The margin keeps the kept tokens clear of the cut, where a tokenizer may
    still merge differently (a run of spaces, a word longer than the window). Texts go through the tokenizer
    TOKENIZE_CHUNK at a time, so memory holds one chunk's full token lists, not every row's."""
    out: list[list[int]] = [[] for _ in texts]
    todo, chars = list(range(len(texts))), (need + CUT_MARGIN_TOKENS) * FIRST_CUT_CHARS_PER_TOKEN
    while todo:
        retry = []
        for start in range(0, len(todo), TOKENIZE_CHUNK):
            chunk = todo[start:start + TOKENIZE_CHUNK]
            cut = [_cut_at_whitespace(texts[i], chars, from_end) for i in chunk]
            ids = tok(cut, add_special_tokens=False, return_attention_mask=False,
                      return_token_type_ids=False)["input_ids"]
            for i, piece, piece_ids in zip(chunk, cut, ids):
                if len(piece) == len(texts[i]) or len(piece_ids) >= need + CUT_MARGIN_TOKENS:
                    out[i] = piece_ids[-need:] if from_end else piece_ids[:need]
                else:
                    retry.append(i)
        todo, chars = retry, chars * 2
    return out


def _cut_at_whitespace(text: str, chars: int, from_end: bool) -> str:
    """The first (last, ``from_end``) ``chars`` characters of ``text``, shortened to end (start) at whitespace when
    there is some in the outer half: tokenizers split words at whitespace, so no word is cut in two there."""
    if len(text) <= chars:
        return text
    if from_end:
        start = len(text) - chars
        found = [i for i in (text.find(" ", start), text.find("\n", start)) if i != -1]
        at = min(found, default=-1)
        return text[at:] if at != -1 and at - start <= chars // 2 else text[start:]
    at = max(text.rfind(" ", 0, chars), text.rfind("\n", 0, chars))
    return text[:at] if at >= chars // 2 else text[:chars]


def encode_rows(df: pd.DataFrame, tok, data_cfg: DataConfig, add_eos: bool) -> list[list[int]]:
    """Token ids for every row of ``df`` (columns prompt/response_a/response_b), at most ``max_length`` each; the
    same ids as tokenizing each text whole and truncating, without tokenizing more than the budget needs. Rows go
    ENCODE_BLOCK at a time, so the formatted texts exist for one block, not for the whole file."""
    prefix, suffix = _special_wrap(tok)
    eos = [tok.eos_token_id] if add_eos and tok.eos_token_id is not None and suffix[-1:] != [tok.eos_token_id] else []
    budget = data_cfg.max_length - len(prefix) - len(suffix) - len(eos)
    if budget < 3:
        raise ValueError(f"data.max_length={data_cfg.max_length} leaves no room for text after special tokens")
    out = []
    for start in range(0, len(df), ENCODE_BLOCK):
        block = df.iloc[start:start + ENCODE_BLOCK]
        out += [prefix + c + suffix + eos for c in _encode_content(block, tok, data_cfg, budget)]
    return out


def _encode_content(df: pd.DataFrame, tok, data_cfg: DataConfig, budget: int) -> list[list[int]]:
    if data_cfg.truncation in ("end", "left"):
        texts = [format_text(p, a, b) for p, a, b in zip(df["prompt"], df["response_a"], df["response_b"])]
        return tokenize_bounded(tok, texts, budget, from_end=data_cfg.truncation == "left")
    # A part can get at most the whole budget, and lengths past it do not change the shares (part_budgets), so each
    # part is tokenized only that far.
    parts = [tokenize_bounded(tok, [pre + t for t in df[col]], budget)
             for pre, col in zip(SEGMENT_PREFIXES, ("prompt", "response_a", "response_b"))]
    content = []
    for segs in zip(*parts):
        take = part_budgets([len(s) for s in segs], budget, data_cfg.prompt_share)
        content.append([t for s, n in zip(segs, take) for t in s[:n]])
    return content


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
    # no part ever keeps more than the budget, so a huge text is only tokenized as far as that (tokenize_bounded)
    prompts = tokenize_bounded(tok, list(df["prompt"]), budget, from_end=True)
    sides = [tokenize_bounded(tok, [PAIR_PREFIXES[1] + t for t in df[col]], budget)
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
