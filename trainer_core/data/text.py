"""The text the model reads, from a cell of the arena file to the padded batch of token ids: one source for training
and for the standalone predictor of an export.

Row text (seed): ``"<prompt>: " + P + "\\n\\n<response_a>: " + A + "\\n\\n<response_b>: " + B``, each part the JSON
list of turns joined with a space (``null`` turns empty; text UTF-8 cannot encode becomes U+FFFD), then the
tokenizer's own special tokens plus EOS (seed: ``add_eos_token=True``), truncated to ``max_length`` tokens
(``truncation``: keep the start, the end, or a share of each part). A text is never tokenized much past what its
budget can keep: a 200,000-word response costs about as much as a short one. ``model.head=pairwise`` reads
(prompt, response) pairs instead (:func:`encode_pairs`).

``orchestrator.export`` copies this very file into every export as ``arena_text.py``, where it runs without the
project: it imports nothing of it - only the standard library, numpy and pandas, and works on the tokenizer object it
is handed. trainer_core.data.tokenization and trainer_core.data.arena build on it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

TEXT_COLUMNS = ("prompt", "response_a", "response_b")
SEGMENT_PREFIXES = ("<prompt>: ", "\n\n<response_a>: ", "\n\n<response_b>: ")
PAIR_PREFIXES = ("<prompt>: ", "\n\n<response>: ")  # model.head=pairwise: one sequence per response
CUT_MARGIN_TOKENS = 16  # tokens past the budget tokenized before a cut text is trusted (see tokenize_bounded)
FIRST_CUT_CHARS_PER_TOKEN = 8  # first character bound per token needed; doubled for rows where it was too few
ENCODE_BLOCK = 1024  # rows formatted at a time
TOKENIZE_CHUNK = 64  # texts per tokenizer call: a fast tokenizer keeps offsets and token strings for every token
# Python strings can hold what UTF-8 cannot encode only as surrogate code points: lone ones from JSON escapes, and
# U+DC80-U+DCFF from reading invalid bytes with errors="surrogateescape".
_SURROGATES = re.compile("[\ud800-\udfff]")


def read_frame(path: str | Path) -> pd.DataFrame:
    """A CSV or parquet file as-is. CSV cells stay strings (object, not pandas' Arrow-backed str) and invalid bytes
    arrive as surrogate escapes, which :func:`repair_text` then replaces."""
    if Path(path).suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype=object, keep_default_na=False, encoding="utf-8", encoding_errors="surrogateescape")


def parse_turns(cell: object) -> str | None:
    """A JSON list of strings (``null`` items allowed) joined with a space; None if the cell is not such a list."""
    if isinstance(cell, (list, tuple, np.ndarray)):  # parquet may already hold lists
        items = list(cell)
    else:
        if not isinstance(cell, str):
            return None
        try:
            items = json.loads(cell)
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(items, list) or not all(x is None or isinstance(x, str) for x in items):
        return None
    return " ".join("" if x is None else x for x in items)


def repair_text(text: str) -> tuple[str, bool]:
    """(``text`` with every character UTF-8 cannot encode replaced by U+FFFD, whether any was)."""
    repaired, n = _SURROGATES.subn("\ufffd", text)
    return repaired, n > 0


def format_text(prompt: str, response_a: str, response_b: str) -> str:
    """The seed's template for one row."""
    return SEGMENT_PREFIXES[0] + prompt + SEGMENT_PREFIXES[1] + response_a + SEGMENT_PREFIXES[2] + response_b


def ensure_pad_token(tok):
    """Right padding, and a pad token (EOS, else UNK, when the tokenizer has none): training and prediction both
    pad this way, so the pooled last real token is found the same way."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


def special_wrap(tok) -> tuple[list[int], list[int]]:
    """(prefix, suffix) special-token ids that the tokenizer puts around a single segment."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []  # pragma: no cover - tokenizers that rewrite content when adding specials


def balanced_budget(lengths: list[int], budget: int) -> list[int]:
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
        return balanced_budget(lengths, budget)
    prompt = min(lengths[0], int(budget * prompt_share))
    a, b = balanced_budget(lengths[1:], budget - prompt)
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
            cut = [cut_at_whitespace(texts[i], chars, from_end) for i in chunk]
            ids = tok(cut, add_special_tokens=False, return_attention_mask=False,
                      return_token_type_ids=False)["input_ids"]
            for i, piece, piece_ids in zip(chunk, cut, ids):
                if len(piece) == len(texts[i]) or len(piece_ids) >= need + CUT_MARGIN_TOKENS:
                    out[i] = piece_ids[-need:] if from_end else piece_ids[:need]
                else:
                    retry.append(i)
        todo, chars = retry, chars * 2
    return out


def cut_at_whitespace(text: str, chars: int, from_end: bool) -> str:
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


def _frame(tok, max_length: int, add_eos: bool) -> tuple[list[int], list[int], list[int], int]:
    """(prefix, suffix, eos, content budget): the special tokens around every sequence and the room left for text."""
    prefix, suffix = special_wrap(tok)
    eos = [tok.eos_token_id] if add_eos and tok.eos_token_id is not None and suffix[-1:] != [tok.eos_token_id] else []
    budget = max_length - len(prefix) - len(suffix) - len(eos)
    if budget < 3:
        raise ValueError(f"data.max_length={max_length} leaves no room for text after special tokens")
    return prefix, suffix, eos, budget


def encode_rows(df: pd.DataFrame, tok, max_length: int, truncation: str, prompt_share: float | None,
                add_eos: bool) -> list[list[int]]:
    """Token ids for every row of ``df`` (columns prompt/response_a/response_b), at most ``max_length`` each; the
    same ids as tokenizing each text whole and truncating, without tokenizing more than the budget needs. Rows go
    ENCODE_BLOCK at a time, so the formatted texts exist for one block, not for the whole file."""
    prefix, suffix, eos, budget = _frame(tok, max_length, add_eos)
    out = []
    for start in range(0, len(df), ENCODE_BLOCK):
        block = df.iloc[start:start + ENCODE_BLOCK]
        out += [prefix + c + suffix + eos for c in _encode_content(block, tok, truncation, prompt_share, budget)]
    return out


def _encode_content(df: pd.DataFrame, tok, truncation: str, prompt_share: float | None,
                    budget: int) -> list[list[int]]:
    if truncation in ("end", "left"):
        texts = [format_text(p, a, b) for p, a, b in zip(df["prompt"], df["response_a"], df["response_b"])]
        return tokenize_bounded(tok, texts, budget, from_end=truncation == "left")
    # A part can get at most the whole budget, and lengths past it do not change the shares (part_budgets), so each
    # part is tokenized only that far.
    parts = [tokenize_bounded(tok, [pre + t for t in df[col]], budget)
             for pre, col in zip(SEGMENT_PREFIXES, TEXT_COLUMNS)]
    content = []
    for segs in zip(*parts):
        take = part_budgets([len(s) for s in segs], budget, prompt_share)
        content.append([t for s, n in zip(segs, take) for t in s[:n]])
    return content


def encode_pairs(df: pd.DataFrame, tok, max_length: int, add_eos: bool) -> list[tuple[list[int], list[int]]]:
    """model.head=pairwise: for every row, the token ids of (prompt, response a) and (prompt, response b), each at most
    ``max_length``. The prompt and the response share the budget fairly (water-filling); a cut prompt keeps its end,
    the turn the response answers, and a cut response keeps its start."""
    prefix, suffix, eos, budget = _frame(tok, max_length, add_eos)
    tag = tok(PAIR_PREFIXES[0], add_special_tokens=False)["input_ids"]
    # no part ever keeps more than the budget, so a huge text is only tokenized as far as that (tokenize_bounded)
    prompts = tokenize_bounded(tok, list(df["prompt"]), budget, from_end=True)
    sides = [tokenize_bounded(tok, [PAIR_PREFIXES[1] + t for t in df[col]], budget)
             for col in ("response_a", "response_b")]

    def one(p: list[int], r: list[int]) -> list[int]:
        p_take, r_take = balanced_budget([len(tag) + len(p), len(r)], budget)
        kept = p[len(p) - max(0, p_take - len(tag)):]  # the prompt's last tokens
        return prefix + tag[:p_take] + kept + r[:r_take] + suffix + eos

    return [(one(p, a), one(p, b)) for p, a, b in zip(prompts, *sides)]


def encode(df: pd.DataFrame, tok, head: str, max_length: int, truncation: str, prompt_share: float | None,
           add_eos: bool) -> list:
    """The rows as the head reads them: one id list per row (joint) or a pair of them (``head="pairwise"``)."""
    if head == "pairwise":
        return encode_pairs(df, tok, max_length, add_eos)
    return encode_rows(df, tok, max_length, truncation, prompt_share, add_eos)


# model.length_features: each row's untruncated lengths, the columns of :func:`length_features`
LENGTH_FEATURES = ("log_chars_prompt", "log_chars_a", "log_chars_b", "log_tokens_prompt", "log_tokens_a",
                   "log_tokens_b")
LENGTH_SWAP = [0, 2, 1, 3, 5, 4]  # the columns of the same row with responses a and b exchanged
LENGTH_TOKEN_CAP = 1 << 15  # tokens counted at most: a longer text counts this many (its log is ~10.4 either way)


def length_features(df: pd.DataFrame, tok) -> np.ndarray:
    """(N, 6) float32 :data:`LENGTH_FEATURES` of the rows of ``df``: log(1 + characters) and log(1 + tokens) of the
    prompt and of each response, whole (before any truncation; tokens without special tokens, counted up to
    LENGTH_TOKEN_CAP). The same function for training, held-out rows, predict and an export's predictor; a row with
    its responses swapped has its columns swapped (``LENGTH_SWAP``)."""
    chars = [np.array([len(t) for t in df[col]], dtype=np.float64) for col in TEXT_COLUMNS]
    tokens = [np.array([len(ids) for ids in tokenize_bounded(tok, list(df[col]), LENGTH_TOKEN_CAP)], dtype=np.float64)
              for col in TEXT_COLUMNS]
    return np.log1p(np.column_stack(chars + tokens)).astype(np.float32).reshape(len(df), len(LENGTH_FEATURES))


def swapped_length_features(features: np.ndarray | None) -> np.ndarray | None:
    """The :func:`length_features` of the same rows with responses a and b exchanged (its columns permuted by
    ``LENGTH_SWAP``: the same numbers as computing them again on the swapped rows, without tokenizing them again);
    None stays None."""
    return None if features is None else features[:, LENGTH_SWAP]


def padded_width(rows: list, multiple: int = 0) -> int:
    """T of :func:`pad_rows` for ``rows``: the longest sequence (of either side of a pairwise row), rounded up to a
    multiple of ``multiple`` when it is > 0."""
    t = max(len(s) for r in rows for s in (r if isinstance(r, tuple) else (r,)))
    return -(-t // multiple) * multiple if multiple > 0 else t


def pad_rows(rows: list, pad_id: int, multiple: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (B, T) int64 input ids and attention mask of encoded rows; ``multiple``: T rounded up to a
    multiple of it (a few fixed lengths for layers compiled with static shapes). Pairwise rows (tuples of sequences)
    are laid out side by side: B rows of 2 sequences give (2B, T), row i's sequences at 2i and 2i + 1."""
    seqs = [s for r in rows for s in r] if rows and isinstance(rows[0], tuple) else rows
    t = padded_width(rows, multiple)
    ids = np.full((len(seqs), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), t), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask
