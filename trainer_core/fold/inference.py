"""Batched prediction of class probabilities, and loading a finished fold's model to predict new rows with it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from trainer_core.data.batching import collate, length_batch, row_tokens
from trainer_core.model.memory import EVAL_BATCH_CAP, eval_batch_size, free_device_bytes


@torch.no_grad()
def predict_probs(model, ids: list, batch_size: int, pad_id: int, device: torch.device,
                  autocast, progress: Callable[[int, int], None] | None = None, multiple: int = 0,
                  features: np.ndarray | None = None) -> np.ndarray:
    """(N, 3) float64 softmax probabilities, rows in input order; batches are formed longest-first to cut padding.

    A model with compiled layers (``model.compile``) gets every batch at ``batch_size`` rows: a short last batch is
    filled with copies of its first row, whose outputs are dropped (a new batch size would compile every kind of
    layer again, ~10 s each on a GPU). The probabilities stay on the device until the end: one copy to the host, no
    wait for the card after every batch. ``progress(rows done, rows)`` is called after each batch is queued.
    ``multiple``: each batch's length rounded up to it (``trainer_core.config.pad_multiple``). ``features``: (N, 6)
    length features of the rows (``model.length_features``), handed to the model beside their ids."""
    from trainer_core import fastpath

    was_training = model.training
    model.eval()
    fill = fastpath.compiled(model)
    order = np.argsort([-row_tokens(x) for x in ids], kind="stable")
    probs = []  # (B, 3) fp32 on the device, batches in ``order``
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        rows_idx = list(idx) + [idx[0]] * ((batch_size - len(idx)) if fill else 0)
        input_ids, mask = collate([ids[j] for j in rows_idx], pad_id, device, multiple)
        extra = {} if features is None else {"length_features": length_batch(features, rows_idx, device)}
        with autocast():
            logits = model(input_ids=input_ids, attention_mask=mask, **extra).logits  # (B, 3)
        probs.append(torch.softmax(logits[:len(idx)].float(), dim=-1))
        if progress is not None:
            progress(i + len(idx), len(order))
    out = np.zeros((len(ids), 3), dtype=np.float64)
    if probs:
        out[order] = torch.cat(probs).cpu().numpy()
    model.train(was_training)
    return out


def resolve_eval_batch_size(setting: int | str, model, ids: list, device: torch.device, *, train_batch: int,
                            budget_gib: float | None = None) -> int:
    """``train.eval_batch_size`` in rows: a number as given; ``auto`` on a GPU: :func:`trainer_core.model.memory.
    eval_batch_size` for the longest sequence of ``ids`` and the memory free now (PyTorch's cached but unused blocks
    count as free); ``auto`` elsewhere: ``train_batch``."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda" or not ids:
        return train_batch
    pairwise = isinstance(ids[0], tuple)
    seq_len = max(len(seq) for row in ids for seq in (row if pairwise else (row,)))
    free = (free_device_bytes(device, budget_gib) + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device))
    return eval_batch_size(model.config, seq_len=seq_len, free_bytes=free, seqs_per_row=2 if pairwise else 1)


def load_fold_model(cfg, adapter_dir: str | Path, device: torch.device,
                    batch_size: int | None = None) -> tuple[object, object, str]:
    """(model in eval mode, tokenizer, precision) of a finished fold, from its ``adapter/`` folder.

    With LoRA the base model is rebuilt exactly as training built it (same quantization, same preparation, same
    random-init seed for ``model.init=random``) and the saved adapter plus score head are loaded onto it; without
    LoRA the folder holds the whole fine-tuned model. Then the fast path as the fold had it, placed for prediction
    (``trainer_core.fastpath.apply``: no recomputation; ``model.dequant_cache`` beside batches of ``batch_size`` rows,
    default the config's ``train.eval_batch_size``, for ``auto`` the largest it may pick);
    ``trainer_core.fastpath.release(model)`` before the model goes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainer_core import fastpath
    from trainer_core.data.tokenization import ensure_pad_token
    from trainer_core.model import joint_head
    from trainer_core.model.build import build_model
    from trainer_core.model.precision import DTYPES, resolve_precision

    adapter_dir = Path(adapter_dir)
    precision = resolve_precision(cfg.train.precision, device)
    tok = ensure_pad_token(AutoTokenizer.from_pretrained(str(adapter_dir)))
    fastpath.prepare_load(cfg.model)
    if cfg.model.head == "pairwise":
        from trainer_core.model.pairwise import PairwisePreferenceModel

        model = PairwisePreferenceModel.from_pretrained(adapter_dir, dtype=DTYPES[precision]).to(device)
    elif cfg.lora.enabled:
        from peft import PeftModel

        # No fresh adapters: the saved ones load.
        base = build_model(cfg.model, replace(cfg.lora, enabled=False, freeze_layers=0),
                           pad_token_id=tok.pad_token_id, precision=precision, device=device, seed=cfg.train.seed)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    elif joint_head.custom(cfg.model):
        model = joint_head.load_full(adapter_dir, cfg.model, DTYPES[precision]).to(device)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(adapter_dir), dtype=DTYPES[precision])
        model.to(device)
    rows = batch_size or (EVAL_BATCH_CAP if cfg.train.eval_batch_size == "auto" else int(cfg.train.eval_batch_size))
    placement = fastpath.place(cfg, model, device=device, precision=precision, seq_len=cfg.data.max_length,
                               micro_batch=rows, budget_gib=cfg.train.memory_budget_gib, training=False)
    fastpath.apply(model, cfg, placement)
    model.eval()
    return model, tok, precision


class RowMeter:
    """predict's progress line: rows scored, rows/s and an ETA, at most every ``every`` seconds. The clock starts when
    the meter is made, as scoring starts (the model loaded and the rows encoded), so the rate counts what the user
    waits for, graphs compiled for new batch shapes included; ``offset`` counts rows of earlier passes (the swapped
    one)."""

    def __init__(self, name: str, total: int, log=print, every: float = 10.0):
        self.name, self.total, self.log, self.every = name, total, log, every
        self.offset, self.done = 0, 0
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, _rows: int) -> None:
        now = time.perf_counter()
        self.done = self.offset + done
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.rate()
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.log(f"{self.name}: {self.done}/{self.total} rows, {rate:.1f} rows/s, eta {eta:.0f}s")

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return self.done / elapsed if elapsed > 0 else 0.0
