"""Write a synthetic file shaped like the Kaggle lmsys-chatbot-arena train.csv: 57,477 rows by default, same columns,
JSON-list text cells, and the oddities the real file holds - so load, validation, folds and tokenization can be
measured (docs/PERFORMANCE.md) without the real data. Generated, never shipped; the text is random words.

What it imitates (the real file's shape, approximately):

- lengths: prompts log-normal around 90 characters with a long tail, responses around 1,100 characters (tail to
  tens of thousands); about 14% of rows are multi-turn (2-6 turns per list); ``--huge`` rows add one response of
  200,000 words each (beyond the real file's longest, to show truncation never tokenizes a text whole);
- nulls: ``[null]`` responses (about 0.4%) and ``null`` turns inside multi-turn lists;
- repeated prompts: about 10% of rows reuse a prompt from a small pool ("hi", the same riddle asked many times...),
  the reason ``data.fold_by=prompt`` exists;
- lone UTF-16 surrogates: a few dozen cells whose JSON holds ``\\ud83d`` without its pair (half an emoji), as rows of
  the real file do; plus accented, CJK and emoji text written as JSON escapes (as ``json.dumps`` writes them);
- labels about 35% a, 34% b, 31% tie; ids unique random integers; model names from a list.

Example::

    python scripts/make_synthetic_arena.py --out /tmp/arena_synthetic.csv
    python scripts/bench_data_prep.py --data /tmp/arena_synthetic.csv
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

N_ROWS = 57_477
FAMILIES = ("gpt-4", "claude-2", "llama-2", "vicuna", "mistral", "gemini-pro", "mixtral", "qwen", "yi", "zephyr")
MODELS = [f"{family}-{size}" for family in FAMILIES for size in ("7b", "13b", "70b", "chat")]
REPEATED_PROMPTS = ["hi", "hello", "What is the meaning of life?", "Tell me a joke.",
                    "How many legs does a cat have if it has 3 legs?", "Write a poem about the sea.",
                    "What is 2+2?", "Who are you?", "Explain quantum computing in simple terms.", "test"]
SPECIAL_WORDS = ["café", "naïve", "日本語", "中文", "😀", "🚀", "—", "“quoted”", "\n", "\n\n", "```", "    "]


def make_vocab(rng: np.random.Generator, n: int = 3000) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, int(k))) for k in rng.integers(1, 11, n)]
    return np.array(words + SPECIAL_WORDS * 20 + [",", ".", "?", "!", ":"] * 40, dtype=object)


def text_of_length(rng: np.random.Generator, vocab: np.ndarray, chars: int) -> str:
    words = rng.choice(vocab, chars // 5 + 2)
    return " ".join(words)[:chars]


def turns(rng: np.random.Generator, vocab: np.ndarray, n_turns: int, chars: int, null_turns: bool) -> list:
    per_turn = max(1, chars // n_turns)
    out: list = [text_of_length(rng, vocab, per_turn) for _ in range(n_turns)]
    if null_turns and n_turns > 1 and rng.random() < 0.3:
        out[int(rng.integers(n_turns))] = None
    return out


def lognormal_chars(rng: np.random.Generator, median: float, sigma: float, cap: int, n: int) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(median), sigma, n), 1, cap).astype(int)


def build(n: int, seed: int, n_surrogates: int, n_huge: int) -> pd.DataFrame:
    """The synthetic rows (see the module docstring)."""
    rng = np.random.default_rng(seed)
    vocab = make_vocab(rng)
    ids = rng.choice(np.arange(30_000, 4_294_967_295, 7919, dtype=np.int64), n, replace=False)
    n_turns = np.where(rng.random(n) < 0.14, rng.integers(2, 7, n), 1)
    prompt_chars = lognormal_chars(rng, 90, 1.5, 30_000, n)
    resp_chars = [lognormal_chars(rng, 1100, 0.9, 60_000, n) for _ in range(2)]
    prompts, responses = [], ([], [])
    for i in range(n):
        if rng.random() < 0.10:
            prompts.append([REPEATED_PROMPTS[int(rng.zipf(1.6)) % len(REPEATED_PROMPTS)]] * int(n_turns[i]))
        else:
            prompts.append(turns(rng, vocab, int(n_turns[i]), int(prompt_chars[i]), null_turns=False))
        for side in (0, 1):
            if rng.random() < 0.004:
                responses[side].append([None])
            else:
                responses[side].append(turns(rng, vocab, int(n_turns[i]), int(resp_chars[side][i]), null_turns=True))
    for i in rng.choice(n, n_surrogates, replace=False):  # half an emoji: a high surrogate without its low half
        cell = responses[int(rng.integers(2))][i]
        cell[0] = (cell[0] or "") + " broken emoji \ud83d here"
    for i in rng.choice(n, n_huge, replace=False):
        responses[0][i] = ["word " * 200_000]
    label = rng.choice(3, n, p=[0.35, 0.34, 0.31])
    return pd.DataFrame({
        "id": ids, "model_a": rng.choice(MODELS, n), "model_b": rng.choice(MODELS, n),
        "prompt": [json.dumps(p) for p in prompts],  # ensure_ascii: non-ASCII and lone surrogates as \\u escapes
        "response_a": [json.dumps(r) for r in responses[0]], "response_b": [json.dumps(r) for r in responses[1]],
        "winner_model_a": (label == 0).astype(int), "winner_model_b": (label == 1).astype(int),
        "winner_tie": (label == 2).astype(int),
    })


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/make_synthetic_arena.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="CSV to write")
    p.add_argument("--rows", type=int, default=N_ROWS, help=f"rows (default {N_ROWS:,}, the real train.csv's count)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0): the same file every time")
    p.add_argument("--surrogates", type=int, default=40, help="cells with a lone UTF-16 surrogate (default 40)")
    p.add_argument("--huge", type=int, default=1, help="rows with a 200,000-word response a (default 1)")
    args = p.parse_args(argv)
    if args.rows < 1 or not 0 <= args.surrogates <= args.rows or not 0 <= args.huge <= args.rows:
        p.error("--rows must be >= 1; --surrogates and --huge between 0 and --rows")
    t0 = time.perf_counter()
    df = build(args.rows, args.seed, args.surrogates, args.huge)
    df.to_csv(args.out, index=False)
    print(f"wrote {len(df):,} rows to {args.out} ({args.out.stat().st_size / 2**20:.0f} MiB, "
          f"{time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
