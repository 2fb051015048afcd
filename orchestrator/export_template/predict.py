"""Score an arena test file with this exported model and write a Kaggle submission - offline, without the project.

    python predict.py --data test.csv --out submission.csv [--time-budget SECONDS] [--no-tta]

Needs torch, transformers, peft, bitsandbytes (quantized exports) and pandas. Rows are sorted by length into batches
of at most ``--batch-tokens`` padded tokens. Every GPU gets a model copy: with test-time augmentation (responses a
and b swapped, probabilities mapped back and averaged) half the GPUs score the original order and the other half the
swapped order; without it they share the rows. On a CPU the same passes run one after the other. With
``--time-budget`` the original order is scored first on every GPU, then the swapped order on the least confident
rows first, for as long as the estimate says it fits; rows left out keep their plain prediction. Each exported
model's probabilities get the run's fitted temperature (``temperature_tta`` for rows with TTA), then the models are
averaged, exactly as ``orchestrator.predict`` does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
EPS = 1e-15  # Kaggle's clip


def clip(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return p / p.sum(axis=1, keepdims=True)


def apply_temperature(p: np.ndarray, t: float) -> np.ndarray:
    logp = np.log(clip(p)) / float(t)
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    return clip(e / e.sum(axis=1, keepdims=True))


def combine(plain: dict, swapped: dict, t_plain: float, t_tta: float) -> tuple[np.ndarray, np.ndarray]:
    """((N, 3) submission probabilities, which rows had TTA). ``swapped[name]`` holds NaN for rows not scored
    swapped; a row has TTA only if every model scored it swapped, so all of its models went the same way."""
    names = list(plain)
    tta = np.ones(len(plain[names[0]]), bool)
    for name in names:
        tta &= ~np.isnan(swapped[name]).any(axis=1) if name in swapped else False
    total = np.zeros((len(tta), 3))
    for name in names:
        p = clip(plain[name])
        if tta.any():
            p[tta] = clip(0.5 * (p[tta] + swapped[name][tta][:, [1, 0, 2]]))
        total += np.where(tta[:, None], apply_temperature(p, t_tta), apply_temperature(p, t_plain))
    return clip(total / len(names)), tta


def choose_swapped_rows(confidence: np.ndarray, cost_s: np.ndarray, seconds_left: float) -> np.ndarray:
    """Rows for the swapped pass, least confident first, as many as fit: the longest prefix of that order whose
    estimated seconds (``cost_s`` per row) sum to at most ``seconds_left``."""
    order = np.argsort(np.asarray(confidence), kind="stable")
    n = int(np.searchsorted(np.cumsum(np.asarray(cost_s, dtype=float)[order]), seconds_left, side="right"))
    return order[:n]


def length_batches(order, lengths: np.ndarray, max_tokens: int, seqs: int) -> list[list[int]]:
    """``order`` cut into batches whose padded size (rows x longest x sequences per row) stays within max_tokens."""
    batches, cur, longest = [], [], 0
    for i in order:
        if cur and max(longest, lengths[i]) * (len(cur) + 1) * seqs > max_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(int(i))
        longest = max(longest, int(lengths[i]))
    return batches + ([cur] if cur else [])


def collate(rows: list, pad_id: int, device):
    """The project's padding and pairwise layout (arena_text.pad_rows), as tensors on ``device``."""
    import torch
    from arena_text import pad_rows

    ids, mask = (torch.from_numpy(a) for a in pad_rows(rows, pad_id))
    return ids.to(device), mask.to(device)


class Progress:
    """One line every ``every`` seconds: rows scored per second and the ETA of the current pass."""

    def __init__(self, label: str, total: int, every: float = 10.0):
        self.label, self.total, self.every, self.done = label, total, every, 0
        self.start = self.last = time.time()
        self.lock = threading.Lock()

    def add(self, n: int, final: bool = False) -> None:
        with self.lock:
            self.done += n
            now = time.time()
            if final or now - self.last >= self.every:
                self.last = now
                rate = self.done / max(now - self.start, 1e-9)
                eta = (self.total - self.done) / rate if rate > 0 else float("inf")
                print(f"{self.label}: {self.done}/{self.total} row-models, {rate:.1f} rows/s, ETA {eta:.0f}s",
                      flush=True)


def run_pass(items: list, scorers: list, encoded: list, out: dict, pad_id: int, progress: Progress,
             deadline: float | None = None, rate: dict | None = None, feats=None) -> None:
    """Score ``items`` ((model name, row indices) each), every scorer in its own thread taking the next one. With a
    ``deadline`` a scorer stops before an item its measured seconds per token say would end past it. ``rate``
    collects busy seconds and padded tokens. ``feats``: the rows' (N, 6) length features, for a length term."""
    rate = rate if rate is not None else {"s": 0.0, "tokens": 0}
    errors, lock = [], threading.Lock()

    def work(scorer, q: queue.Queue):
        while True:
            try:
                name, idx = q.get_nowait()
            except queue.Empty:
                return
            rows = [encoded[i] for i in idx]
            tokens = max(len(s) for r in rows for s in (r if isinstance(r, tuple) else (r,))) * len(rows)
            with lock:
                per_token = rate["s"] / rate["tokens"] if rate["tokens"] else 0.0
            if deadline is not None and time.time() + tokens * per_token > deadline:
                return
            t0 = time.time()
            try:
                ids, mask = collate(rows, pad_id, scorer.device)
                out[name][idx] = scorer.probs(name, ids, mask, None if feats is None else feats[idx]).cpu().numpy()
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors.append(e)
                return
            with lock:
                rate["s"] += time.time() - t0
                rate["tokens"] += tokens
            progress.add(len(idx))

    q = queue.Queue()
    for item in items:
        q.put(item)
    threads = [threading.Thread(target=work, args=(s, q)) for s in scorers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    progress.add(0, final=True)


def verify_manifest(root: Path) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        h = hashlib.sha256()
        with open(root / rel, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        if h.hexdigest() != entry["sha256"]:
            raise SystemExit(f"error: {root / rel}: sha256 differs from manifest.json (a broken upload?)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="test CSV or parquet: id, prompt, response_a, response_b")
    p.add_argument("--out", type=Path, required=True,
                   help="submission CSV to write (id,winner_model_a,winner_model_b,winner_tie)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="finish within this many seconds of starting: the swapped (TTA) pass then covers the least "
                        "confident rows first, as many as fit")
    p.add_argument("--no-tta", action="store_true", help="score the original order only")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="padded tokens per batch (rows x longest row); lower it if a card runs out of memory")
    p.add_argument("--device", default="auto", help="'auto' (every GPU, else the CPU), 'cpu' or 'cuda:0'")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="compute dtype: auto = fp32 on a CPU, bf16 on a card that has it, fp16 elsewhere (a T4); "
                        "fp16 on a bf16 card checks before uploading what a T4 will compute")
    p.add_argument("--verify", action="store_true", help="check every file's sha256 against manifest.json first")
    args = p.parse_args(argv)
    start = time.time()
    import torch
    from arena_text import ensure_pad_token, swapped_length_features
    from submission_model import Scorer
    from submission_text import InputError, encode, features, read_test, swap_responses
    from transformers import AutoTokenizer

    cfg = json.loads((HERE / "export_config.json").read_text())
    if args.verify:
        verify_manifest(HERE)
    try:
        rows = read_test(args.data)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = ensure_pad_token(AutoTokenizer.from_pretrained(str(HERE / "tokenizer")))  # pads as the project does
    tta = not args.no_tta and cfg["head"] != "pairwise"  # the pairwise head is symmetric: a swap changes nothing
    if args.device == "auto":
        devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())] or [torch.device("cpu")]
    else:
        devices = [torch.device(args.device)]
    scorers = [Scorer(HERE, cfg, d, tok.pad_token_id, args.precision) for d in devices]
    names, n = scorers[0].names, len(rows)
    print(f"{n} rows, models {names}, {', '.join(f'{s.device} ({s.precision})' for s in scorers)}, "
          f"TTA {'on' if tta else 'off'}; loaded in {time.time() - start:.0f}s", flush=True)
    encoded, feats = encode(rows, tok, cfg["text"], cfg["head"]), features(rows, tok, cfg)
    seqs = 2 if cfg["head"] == "pairwise" else 1
    lengths = np.array([max(len(s) for s in (r if isinstance(r, tuple) else (r,))) for r in encoded])
    by_length = np.argsort(-lengths, kind="stable")  # longest first: a batch too big for the card fails at once
    plain = {k: np.full((n, 3), np.nan) for k in names}
    swapped = {k: np.full((n, 3), np.nan) for k in names}
    items = [(k, b) for b in length_batches(by_length, lengths, args.batch_tokens, seqs) for k in names]
    swapped_enc = encode(swap_responses(rows), tok, cfg["text"], cfg["head"]) if tta else None
    s_feats = swapped_length_features(feats) if tta else None  # lengths swap with the responses
    if tta and len(scorers) > 1 and args.time_budget is None:  # original order on even cards, swapped on odd ones
        s_lengths = np.array([len(r) for r in swapped_enc])
        s_items = [(k, b) for b in length_batches(np.argsort(-s_lengths, kind="stable"), s_lengths,
                                                  args.batch_tokens, seqs) for k in names]
        groups = [[s for i, s in enumerate(scorers) if i % 2 == side] for side in (0, 1)]
        passes = [_Pass(items, groups[0], encoded, plain, tok.pad_token_id,
                        Progress("original order", n * len(names)), None, None, feats),
                  _Pass(s_items, groups[1], swapped_enc, swapped, tok.pad_token_id,
                        Progress("swapped order", n * len(names)), None, None, s_feats)]
        for t in passes:
            t.start()
        for t in passes:
            t.join()
        for t in passes:
            if t.error is not None:
                raise t.error
    else:
        rate = {"s": 0.0, "tokens": 0}
        run_pass(items, scorers, encoded, plain, tok.pad_token_id, Progress("original order", n * len(names)),
                 rate=rate, feats=feats)
        if tta:
            chosen = np.arange(n)
            deadline = None
            if args.time_budget is not None:
                deadline = start + args.time_budget - max(5.0, 0.01 * args.time_budget)  # room to write the file
                per_row = np.array([len(r) for r in swapped_enc]) * len(names) * rate["s"] / max(rate["tokens"], 1)
                confidence, _ = combine(plain, {}, 1.0, 1.0)
                chosen = choose_swapped_rows(confidence.max(axis=1), per_row / len(scorers), deadline - time.time())
                print(f"time budget: swapped pass on {len(chosen)}/{n} rows, least confident first", flush=True)
            s_lengths = np.array([len(r) for r in swapped_enc])
            s_items = []
            for g in range(0, len(chosen), 1024):  # confidence order kept between groups, lengths sorted within
                group = chosen[g:g + 1024]
                group = group[np.argsort(-s_lengths[group], kind="stable")]
                s_items += [(k, b) for b in length_batches(group, s_lengths, args.batch_tokens, seqs) for k in names]
            run_pass(s_items, scorers, swapped_enc, swapped, tok.pad_token_id,
                     Progress("swapped order", len(chosen) * len(names)), deadline=deadline, rate=rate,
                     feats=s_feats)
    probs, had_tta = combine(plain, swapped if tta else {}, cfg["temperature"],
                             cfg["temperature_tta"] if cfg.get("temperature_tta") is not None else 1.0)
    import pandas as pd

    sub = pd.DataFrame({"id": rows["id"].values, "winner_model_a": probs[:, 0], "winner_model_b": probs[:, 1],
                        "winner_tie": probs[:, 2]})
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    sub.to_csv(tmp, index=False)
    os.replace(tmp, args.out)
    print(f"wrote {n} rows to {args.out} ({int(had_tta.sum())} with TTA) in {time.time() - start:.0f}s", flush=True)
    return 0


class _Pass(threading.Thread):
    """One :func:`run_pass` beside another (the original order on some cards, the swapped order on the others)."""

    def __init__(self, *args):
        super().__init__()
        self.pass_args, self.error = args, None

    def run(self) -> None:
        try:
            run_pass(*self.pass_args)
        except BaseException as e:  # noqa: BLE001 - re-raised by the main thread
            self.error = e


if __name__ == "__main__":
    sys.exit(main())
