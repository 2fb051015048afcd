"""Reading an arena test file and turning its rows into token ids, exactly as the project trained on them.

Standalone (pandas and a Hugging Face tokenizer only): a copy of the project's ``trainer_core/data/arena.py`` parsing
and ``trainer_core/data/tokenization.py`` encoding, with every setting (template prefixes, ``max_length``,
truncation, prompt share, EOS) read from the export's ``export_config.json``. The project's tests check that this
file gives the same ids as the project for every truncation mode and both heads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

TEXT_COLUMNS = ("prompt", "response_a", "response_b")
_SURROGATES = re.compile("[\ud800-\udfff]")  # what UTF-8 cannot encode; becomes U+FFFD as in training


class InputError(ValueError):
    """A test file that cannot be scored; the message is one line naming the file, column and ids."""


def parse_turns(cell) -> str | None:
    """A JSON list of strings (null items allowed) joined with a space; None when the cell is not such a list."""
    if isinstance(cell, (list, tuple, np.ndarray)):
        items = list(cell)
    elif isinstance(cell, str):
        try:
            items = json.loads(cell)
        except (json.JSONDecodeError, RecursionError):
            return None
    else:
        return None
    if not isinstance(items, list) or not all(x is None or isinstance(x, str) for x in items):
        return None
    return " ".join("" if x is None else x for x in items)


def read_test(path: str | Path) -> pd.DataFrame:
    """id (int64), prompt, response_a, response_b (joined text) of a CSV or parquet in the arena format."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.suffix.lower() in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    else:  # object columns, invalid bytes as surrogate escapes: replaced below, as the project does
        df = pd.read_csv(path, dtype=object, keep_default_na=False, encoding="utf-8",
                         encoding_errors="surrogateescape")
    missing = [c for c in ("id", *TEXT_COLUMNS) if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    ids = pd.to_numeric(df["id"], errors="coerce")
    if ids.isna().any() or not (ids == ids.round()).all():
        raise InputError(f"{path}: column 'id': missing or non-integer values")
    out = pd.DataFrame({"id": ids.astype("int64").values})
    for col in TEXT_COLUMNS:
        parsed = [parse_turns(v) for v in df[col].values]
        bad = [int(out["id"].iat[i]) for i, p in enumerate(parsed) if p is None]
        if bad:
            raise InputError(f"{path}: column '{col}': ids {bad[:5]}: not a JSON list of strings")
        out[col] = [_SURROGATES.sub("\ufffd", p) for p in parsed]
    return out


def swap_responses(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with response a and b exchanged (test-time augmentation)."""
    out = rows.copy()
    out["response_a"], out["response_b"] = rows["response_b"].values, rows["response_a"].values
    return out


def _special_wrap(tok) -> tuple[list[int], list[int]]:
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def _balanced_budget(lengths: list[int], budget: int) -> list[int]:
    take, remaining = [0] * len(lengths), budget
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


def _part_budgets(lengths: list[int], budget: int, prompt_share: float | None) -> list[int]:
    if prompt_share is None:
        return _balanced_budget(lengths, budget)
    prompt = min(lengths[0], int(budget * prompt_share))
    a, b = _balanced_budget(lengths[1:], budget - prompt)
    return [min(lengths[0], budget - a - b), a, b]


def _cut_at_whitespace(text: str, chars: int, from_end: bool) -> str:
    if len(text) <= chars:
        return text
    if from_end:
        start = len(text) - chars
        found = [i for i in (text.find(" ", start), text.find("\n", start)) if i != -1]
        at = min(found, default=-1)
        return text[at:] if at != -1 and at - start <= chars // 2 else text[start:]
    at = max(text.rfind(" ", 0, chars), text.rfind("\n", 0, chars))
    return text[:at] if at >= chars // 2 else text[:chars]


def tokenize_bounded(tok, texts: list[str], need: int, spec: dict, from_end: bool = False) -> list[list[int]]:
    """The first (``from_end``: last) ``need`` ids of each text, without tokenizing a huge text whole."""
    margin, chunk_size = spec["cut_margin_tokens"], spec["tokenize_chunk"]
    out: list[list[int]] = [[] for _ in texts]
    todo, chars = list(range(len(texts))), (need + margin) * spec["first_cut_chars_per_token"]
    while todo:
        retry = []
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            cut = [_cut_at_whitespace(texts[i], chars, from_end) for i in chunk]
            ids = tok(cut, add_special_tokens=False, return_attention_mask=False,
                      return_token_type_ids=False)["input_ids"]
            for i, piece, piece_ids in zip(chunk, cut, ids):
                if len(piece) == len(texts[i]) or len(piece_ids) >= need + margin:
                    out[i] = piece_ids[-need:] if from_end else piece_ids[:need]
                else:
                    retry.append(i)
        todo, chars = retry, chars * 2
    return out


def _frame(tok, spec: dict) -> tuple[list[int], list[int], list[int], int]:
    prefix, suffix = _special_wrap(tok)
    add = spec["add_eos_token"] and tok.eos_token_id is not None and suffix[-1:] != [tok.eos_token_id]
    eos = [tok.eos_token_id] if add else []
    return prefix, suffix, eos, spec["max_length"] - len(prefix) - len(suffix) - len(eos)


def encode_joint(df: pd.DataFrame, tok, spec: dict) -> list[list[int]]:
    """One id list per row: the three parts in the template, truncated as configured."""
    prefix, suffix, eos, budget = _frame(tok, spec)
    pre = spec["segment_prefixes"]
    if spec["truncation"] in ("end", "left"):
        texts = [pre[0] + p + pre[1] + a + pre[2] + b for p, a, b in zip(df["prompt"], df["response_a"],
                                                                         df["response_b"])]
        content = tokenize_bounded(tok, texts, budget, spec, from_end=spec["truncation"] == "left")
    else:
        parts = [tokenize_bounded(tok, [p + t for t in df[col]], budget, spec) for p, col in zip(pre, TEXT_COLUMNS)]
        content = []
        for segs in zip(*parts):
            take = _part_budgets([len(s) for s in segs], budget, spec["prompt_share"])
            content.append([t for s, n in zip(segs, take) for t in s[:n]])
    return [prefix + c + suffix + eos for c in content]


def encode_pairs(df: pd.DataFrame, tok, spec: dict) -> list[tuple[list[int], list[int]]]:
    """Pairwise head: (prompt, response a) and (prompt, response b) per row, the prompt keeping its end."""
    prefix, suffix, eos, budget = _frame(tok, spec)
    pre = spec["pair_prefixes"]
    tag = tok(pre[0], add_special_tokens=False)["input_ids"]
    prompts = tokenize_bounded(tok, list(df["prompt"]), budget, spec, from_end=True)
    sides = [tokenize_bounded(tok, [pre[1] + t for t in df[col]], budget, spec) for col in ("response_a", "response_b")]

    def one(p: list[int], r: list[int]) -> list[int]:
        p_take, r_take = _balanced_budget([len(tag) + len(p), len(r)], budget)
        return prefix + tag[:p_take] + p[len(p) - max(0, p_take - len(tag)):] + r[:r_take] + suffix + eos

    return [(one(p, a), one(p, b)) for p, a, b in zip(prompts, *sides)]


def encode(df: pd.DataFrame, tok, spec: dict, head: str) -> list:
    """Rows as the exported head reads them; ``spec``: export_config.json's ``text``. Rows go 1,024 at a time, so
    formatted texts exist for one block only."""
    fn = encode_pairs if head == "pairwise" else encode_joint
    return [ids for s in range(0, len(df), 1024) for ids in fn(df.iloc[s:s + 1024], tok, spec)]
