"""Train one fold and predict its held-out rows: the whole loop, top to bottom.

Runs in one process, or as one rank of a ``torch.distributed`` group (the caller sets that up; this module never
imports Ray). Only rank 0 writes files; every rank calls ``report`` the same number of times, with the same keys.

Files written to ``out_dir`` (the contract with the reducer): ``oof.parquet`` (id, fold, label, p_a, p_b, p_tie),
``config.yaml``, ``adapter/`` (adapter or model weights plus tokenizer) and, last, ``metrics.json``: a fold whose
``metrics.json`` exists finished. With ``train.eval_tta`` the OOF file also holds p_a_tta, p_b_tta, p_tie_tta.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from trainer_core import metrics as M
from trainer_core.batching import collate, epoch_batches, planned_steps, rank_slice
from trainer_core.config import Config
from trainer_core.fold_state import load_checkpoint, save_checkpoint, write_fold_files
from trainer_core.inference import predict_probs
from trainer_core.memory import apply_budget, free_device_bytes, plan_memory
from trainer_core.modeling import (
    build_model,
    decoder_layer_count,
    enable_checkpointing,
    resolve_precision,
    trainable_parameters,
)
from trainer_core.optim import build_optimizer, lr_at
from trainer_core.step import make_autocast, train_step
from trainer_core.telemetry import Telemetry
from trainer_core.tokenization import build_tokenizer, encode_rows
from trainer_core.tta import swap_responses, tta_average

log = logging.getLogger(__name__)

# report(metrics, checkpoint_dir): checkpoint_dir is a folder on rank 0 when a checkpoint was written, else None.
ReportFn = Callable[[dict, Optional[Path]], None]


@dataclass
class FoldResult:
    fold: int
    metrics: dict
    oof: pd.DataFrame  # id, fold, label, p_a, p_b, p_tie


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _gather_rows(local: np.ndarray, local_idx: np.ndarray, n: int, world: int) -> np.ndarray:
    """Rank-sharded predictions back into one (n, 3) array on every rank."""
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, (local_idx, local))
    out = np.zeros((n, 3))
    for idx, p in parts:
        out[idx] = p
    return out


def train_fold(cfg: Config, fold: int, rows: pd.DataFrame, out_dir: str | Path, *,
               resume_from: str | Path | None = None, report: ReportFn | None = None,
               tb_dir: str | Path | None = None, device: torch.device | None = None,
               stop_at: float | None = None) -> FoldResult | None:
    """Train on every row whose ``fold`` != ``fold``, predict the rows of ``fold``, write the fold's files.

    ``rows``: validated data with columns id, prompt, response_a, response_b, label, fold.
    ``resume_from``: a checkpoint folder written by this function for the same config and fold.
    ``report``: called with metrics at every log step, with a checkpoint folder every ``train.checkpoint_every``
    steps, and once at the end with the fold's final metrics.
    ``stop_at``: pause after this fraction of the fold's steps (a piece of a rotated schedule): report a checkpoint
    there (metrics carry ``paused: True``) and return None; a later call resumed from it continues the fold."""
    # ---------------------------------------------------------------- setup
    t_fold = time.perf_counter()
    t = cfg.train
    out_dir = Path(out_dir)
    rank, world = dist_info()
    device = device or default_device()
    precision = resolve_precision(t.precision, device)
    seed_everything(t.seed + fold)
    fingerprint = f"{cfg.fingerprint()}:fold={fold}"

    tok = build_tokenizer(cfg.model)
    train_rows = rows[rows["fold"] != fold].reset_index(drop=True)
    val_rows = rows[rows["fold"] == fold].sort_values("id").reset_index(drop=True)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError(f"fold {fold}: {len(train_rows)} training rows and {len(val_rows)} held-out rows; need both")
    train_ids = encode_rows(train_rows, tok, cfg.data, cfg.model.add_eos_token)
    val_ids = encode_rows(val_rows, tok, cfg.data, cfg.model.add_eos_token)
    train_labels = torch.tensor(train_rows["label"].values, dtype=torch.long)
    lengths = np.array([len(x) for x in train_ids])

    apply_budget(device, t.memory_budget_gib)
    model = build_model(cfg.model, cfg.lora, pad_token_id=tok.pad_token_id, precision=precision, device=device,
                        seed=t.seed)
    micro_bs, accum = t.batch_size, t.grad_accum
    if world > 1 and t.batch_size % world == 0:
        micro_bs = t.batch_size // world  # the optimizer batch (batch_size x grad_accum) stays the recipe's
    elif world > 1:
        log.warning("fold %d: train.batch_size=%d does not split over %d ranks; the optimizer batch grows %dx",
                    fold, t.batch_size, world, world)
    if cfg.model.gradient_checkpointing == "auto" and device.type == "cuda":
        n_layers = decoder_layer_count(model)
        plan = plan_memory(model.config, n_trained_layers=n_layers - cfg.lora.freeze_layers,
                           seq_len=int(lengths.max()), batch_size=micro_bs, grad_accum=accum,
                           free_bytes=free_device_bytes(device, t.memory_budget_gib))
        if plan.checkpointing:
            enable_checkpointing(model)
        micro_bs, accum = plan.micro_batch, plan.grad_accum
        log.info("fold %d: memory plan: %s (%.1f GiB estimated of %.1f GiB free)", fold, plan.reason, plan.need_gib,
                 plan.free_gib)
    params = trainable_parameters(model)
    optimizer = build_optimizer(params, t, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)

    autocast = make_autocast(precision, device)

    micro_per_epoch, total_steps = planned_steps(len(train_ids), micro_bs, world, t.epochs, accum, t.max_steps)
    total_micro = math.ceil(t.epochs * micro_per_epoch)
    total_micro = min(total_micro, total_steps * accum) if not t.max_steps else total_steps * accum
    plans: dict[int, list[np.ndarray]] = {}

    def micro_batch(m: int) -> np.ndarray:
        epoch, pos = divmod(m, micro_per_epoch)
        if epoch not in plans:
            plans.clear()
            plans[epoch] = epoch_batches(lengths, micro_bs, world, t.seed + fold, epoch, t.group_by_length)
        return rank_slice(plans[epoch][pos], rank, world)

    # Interim evaluation (for early stopping of sweeps): the first train.interim_eval_rows held-out rows by id.
    interim_n = min(len(val_ids), t.interim_eval_rows)

    def interim_eval(at_step: int) -> dict:
        idx = np.arange(rank, interim_n, world)
        local = predict_probs(model, [val_ids[i] for i in idx], t.eval_batch_size, tok.pad_token_id, device,
                              autocast)
        p = M.clip_probs(_gather_rows(local, idx, interim_n, world))
        y = val_rows["label"].values[:interim_n]
        return {"interim_log_loss": M.log_loss(y, p), "interim_accuracy": M.accuracy(y, p), "interim_rows": interim_n}

    step, before = 0, {}
    if resume_from is not None:
        step, before = load_checkpoint(Path(resume_from), model, optimizer, scaler, fingerprint)
        log.info("fold %d: resumed at step %d/%d from %s", fold, step, total_steps, resume_from)
    telemetry = Telemetry(tb_dir if rank == 0 else None, device)
    ckpt_root = Path(tempfile.mkdtemp(prefix=f"fold{fold}-ckpt-")) if rank == 0 else None

    # ---------------------------------------------------------------- fit
    stop_step = total_steps if stop_at is None else min(total_steps, max(step + 1, round(total_steps * stop_at)))
    ddp_model.train()
    start_step = step
    t_start, samples, tokens = time.perf_counter(), 0, 0

    def totals() -> dict:  # seconds and samples of every run of this fold so far, this one included
        return {"train_seconds": before.get("train_seconds", 0.0) + time.perf_counter() - t_start,
                "fold_seconds": before.get("fold_seconds", 0.0) + time.perf_counter() - t_fold,
                "samples": before.get("samples", 0) + samples}

    window_loss, window_n = torch.zeros((), device=device), 0
    while step < stop_step:
        lr = lr_at(step, total_steps, t)
        for g in optimizer.param_groups:
            g["lr"] = lr
        n_micro = min(accum, total_micro - step * accum)
        micro = []
        for a in range(n_micro):
            idx = micro_batch(step * accum + a)
            input_ids, mask = collate([train_ids[i] for i in idx], tok.pad_token_id, device)
            micro.append((input_ids, mask, train_labels[idx].to(device, non_blocking=True)))
            samples += len(idx) * world
            tokens += int(lengths[idx].sum()) * world
        loss, grad_norm = train_step(ddp_model, micro, optimizer, scaler, params, autocast, t.max_grad_norm,
                                     ddp=world > 1)
        window_loss += loss
        window_n += 1
        step += 1

        pause = step == stop_step < total_steps
        do_log = step % t.log_every == 0 or step == total_steps or pause
        do_ckpt = (bool(t.checkpoint_every) and step % t.checkpoint_every == 0 and step < total_steps) or pause
        do_eval = bool(t.eval_every) and step % t.eval_every == 0 and step < total_steps
        if not (do_log or do_ckpt or do_eval):
            continue
        logs = {"fold": fold, "step": step, "total_steps": total_steps, "start_step": start_step,
                "elapsed_s": time.perf_counter() - t_start, **({"paused": True} if pause else {})}
        if do_log:
            elapsed = time.perf_counter() - t_start
            logs.update(train_loss=float(window_loss) / window_n, lr=lr, grad_norm=float(grad_norm),
                        samples_per_s=samples / elapsed, tokens_per_s=tokens / elapsed, **telemetry.memory())
            window_loss, window_n = torch.zeros((), device=device), 0
            telemetry.scalars(logs, step)
        if do_eval:
            logs.update(interim_eval(step))
            telemetry.scalars({k: v for k, v in logs.items() if k.startswith("interim_")}, step)
        ckpt = None
        if do_ckpt and rank == 0:
            ckpt = ckpt_root / f"step={step:07d}"
            ckpt.mkdir()
            save_checkpoint(ckpt, model, optimizer, scaler, step, fingerprint, totals())
        if report is not None:
            report(logs, ckpt)  # the reporter copies the checkpoint to durable storage before returning
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)
    if step < total_steps:  # paused: the checkpoint reported at this step is where a later piece continues
        telemetry.close()
        if ckpt_root is not None:
            shutil.rmtree(ckpt_root, ignore_errors=True)
        return None
    run_train_seconds = time.perf_counter() - t_start
    done = totals()
    train_seconds = done["train_seconds"]

    # ---------------------------------------------------------------- evaluate
    local_idx = np.arange(rank, len(val_ids), world)
    local = predict_probs(model, [val_ids[i] for i in local_idx], t.eval_batch_size, tok.pad_token_id, device,
                          autocast)
    probs = M.clip_probs(_gather_rows(local, local_idx, len(val_ids), world))
    labels = val_rows["label"].values
    oof = pd.DataFrame({"id": val_rows["id"].values, "fold": fold, "label": labels,
                        "p_a": probs[:, 0], "p_b": probs[:, 1], "p_tie": probs[:, 2]})
    result = {
        "fold": fold,
        "log_loss": M.log_loss(labels, probs),
        "accuracy": M.accuracy(labels, probs),
        "n_rows": int(len(val_rows)),
        "n_train_rows": int(len(train_rows)),
        "prior_log_loss": M.log_loss(labels, M.prior_probs(train_rows["label"].values, len(val_rows))),
        "steps": step,
        "train_seconds": train_seconds,  # every run of this fold (pieces, restarts after a failure) together
        "train_samples_per_s": done["samples"] / train_seconds if train_seconds > 0 else None,
        "fold_seconds": totals()["fold_seconds"],  # load + train + predict, every run of this fold
        "last_run_seconds": time.perf_counter() - t_fold,  # this run alone (a fold in pieces: its last piece)
        "last_run_train_seconds": run_train_seconds,
        "resumed_from_step": start_step,  # 0 unless this run continued from a checkpoint
        "precision": precision,
        "device": str(device),
        "world_size": world,
        "fingerprint": fingerprint,
    }
    if t.eval_tta:  # the same rows with responses a/b swapped, averaged back; p_a/p_b/p_tie stay the plain figure
        swapped_ids = encode_rows(swap_responses(val_rows), tok, cfg.data, cfg.model.add_eos_token)
        local = predict_probs(model, [swapped_ids[i] for i in local_idx], t.eval_batch_size, tok.pad_token_id, device,
                              autocast)
        tta = M.clip_probs(tta_average(probs, _gather_rows(local, local_idx, len(val_ids), world)))
        oof[["p_a_tta", "p_b_tta", "p_tie_tta"]] = tta
        result.update(log_loss_tta=M.log_loss(labels, tta), accuracy_tta=M.accuracy(labels, tta))
    telemetry.scalars({"eval_log_loss": result["log_loss"], "eval_accuracy": result["accuracy"]}, step)
    telemetry.close()

    # ---------------------------------------------------------------- write artifacts (rank 0 only)
    if rank == 0:
        write_fold_files(out_dir, cfg, model, tok, oof, result)
        shutil.rmtree(ckpt_root, ignore_errors=True)
    if report is not None:
        report({**result, "done": True}, None)
    return FoldResult(fold=fold, metrics=result, oof=oof)
