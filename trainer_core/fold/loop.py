"""Train one fold and predict its held-out rows: setup, the training loop, evaluation, the fold's files.

Runs in one process, or as one rank of a ``torch.distributed`` group (the caller sets that up; this module never
imports Ray). Only rank 0 writes files; every rank calls ``report`` the same number of times, with the same keys.

Files written to ``out_dir`` (the contract with the reducer): ``oof.parquet`` (id, fold, label, p_a, p_b, p_tie),
``config.yaml``, ``adapter/`` (adapter or model weights plus tokenizer) and, last, ``metrics.json``: a fold whose
``metrics.json`` exists finished. With ``train.eval_tta`` the OOF file also holds p_a_tta, p_b_tta, p_tie_tta.

The story, as in a torchtune recipe: ``FoldRun.setup`` (data, model, optimizer, a resumed checkpoint),
``FoldRun.train`` (the training graphs compiled first, ``model.precompile``; then the loop, one optimizer step at a
time, with logging, checkpoints and interim evaluations), ``FoldRun.evaluate_fold`` (held-out rows, sharded over
ranks: :mod:`trainer_core.fold.evaluate`), ``FoldRun.finish`` (metrics and the fold's files).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from trainer_core import fastpath
from trainer_core.config import Config, pad_multiple
from trainer_core.data.tokenization import build_tokenizer
from trainer_core.fastpath.recompiles import RecompileCounter
from trainer_core.fold import ranks, warm_compile
from trainer_core.fold.data import BatchSchedule, FoldData, plan_batches, rank_micro_batch
from trainer_core.fold.distill import fold_loss
from trainer_core.fold.evaluate import HeldOut, held_out_scores
from trainer_core.fold.optim import build_optimizer, lr_at
from trainer_core.fold.precompile import compile_passes, first_batch_of_each_length, resized
from trainer_core.fold.ranks import dist_info, gather_objects, min_over_ranks, rank_seed
from trainer_core.fold.state import FoldMetrics, load_checkpoint, rng_state, save_checkpoint, write_fold_files
from trainer_core.fold.step import train_step
from trainer_core.fold.telemetry import Telemetry
from trainer_core.model.build import build_model, fit_length_term, trainable_parameters
from trainer_core.model.memory import apply_budget, free_device_bytes
from trainer_core.model.precision import make_autocast, resolve_precision

log = logging.getLogger(__name__)

# report(metrics, checkpoint_dir): checkpoint_dir is a folder on rank 0 when a checkpoint was written, else None.
ReportFn = Callable[[dict, Optional[Path]], None]


@dataclass
class FoldResult:
    fold: int
    metrics: FoldMetrics
    oof: pd.DataFrame  # id, fold, label, p_a, p_b, p_tie


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
    run = FoldRun(cfg, fold, device=device, report=report)
    try:
        run.setup(rows, resume_from, tb_dir)
        if not run.train(stop_at):
            return None  # paused: the checkpoint reported at the last step is where a later piece continues
        metrics, oof = run.evaluate_fold()
        run.finish(Path(out_dir), metrics, oof)
        return FoldResult(fold=fold, metrics=metrics, oof=oof)
    finally:
        run.close()


class FoldRun:
    """The state of one fold's run on this rank: what setup builds, what the loop advances."""

    def __init__(self, cfg: Config, fold: int, *, device: torch.device | None, report: ReportFn | None):
        self.cfg, self.fold, self.report = cfg, fold, report
        self.rank, self.world = dist_info()
        self.device = device or ranks.default_device()
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.autocast = make_autocast(self.precision, self.device)
        self.multiple = pad_multiple(cfg.model)  # batch lengths rounded up to it: static compiled shapes
        self.fingerprint = f"{cfg.fingerprint()}:fold={fold}"
        self.t_fold = time.perf_counter()
        self.before: dict = {}  # seconds and samples spent by earlier runs of this fold (pieces, restarts)
        self.telemetry: Telemetry | None = None
        self.ckpt_root: Path | None = None
        self.speed: fastpath.FastPath | None = None
        self.recompiles = RecompileCounter()  # torch.compile's recompilations from the build to the fold's end
        self.helpers: warm_compile.Helpers | None = None  # cluster.compile_helpers, until the model is placed

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, rows: pd.DataFrame, resume_from: str | Path | None, tb_dir: str | Path | None) -> None:
        """Tokenized rows, the model (plain build, placement, fast path: as the benchmark builds it), optimizer and
        loss scaler; then a checkpoint, if any."""
        cfg, t = self.cfg, self.cfg.train
        ranks.seed_everything(t.seed + self.fold)
        self.tok = build_tokenizer(cfg.model)
        self.data = FoldData.build(cfg, self.fold, rows, self.tok)
        apply_budget(self.device, t.memory_budget_gib)
        self.helpers = warm_compile.start_for_fold(cfg, self.fold, self.data, pad_id=self.tok.pad_token_id,
                                                   device=self.device, precision=self.precision, world=self.world)
        self.recompiles.start()
        fastpath.prepare_load(cfg.model)
        self.model = build_model(cfg.model, cfg.lora, pad_token_id=self.tok.pad_token_id, precision=self.precision,
                                 device=self.device, seed=t.seed)
        warm_compile.wait(self.helpers)  # their memory is free before the placement reads what is free
        if cfg.model.length_features:  # fitted on this fold's training rows alone, before DDP copies rank 0's
            loss = fit_length_term(self.model, self.data.train_feats, self.data.train_labels.numpy())
            log.info("fold %d: length term fitted on the training rows: log loss %.4f", self.fold, loss)
        # every rank plans from the smallest free memory of all: different plans would hang DDP's all-reduce
        free = (min_over_ranks(free_device_bytes(self.device, t.memory_budget_gib), self.device, self.world)
                if self.device.type == "cuda" else None)
        placement = fastpath.place(cfg, self.model, device=self.device, precision=self.precision,
                                   seq_len=int(self.data.lengths.max()), grad_accum=t.grad_accum,
                                   micro_batch=rank_micro_batch(cfg, self.fold, self.world),
                                   budget_gib=t.memory_budget_gib, free_bytes=free)
        log.info("fold %d: placement: %s", self.fold, placement.reason)
        self.speed = fastpath.apply(self.model, cfg, placement)
        self.held_out = HeldOut(cfg, self.fold, self.model, self.tok, self.device, self.autocast, self.multiple,
                                rank=self.rank, world=self.world)
        self.batches: BatchSchedule = plan_batches(cfg, self.fold, self.data.lengths, placement, self.world)
        self.params = trainable_parameters(self.model)
        self.loss_fn = fold_loss(t, soft_labels=self.data.train_soft is not None)
        self.optimizer = build_optimizer(self.params, t, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.ddp_model = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False)
            # Same seed above: every rank built the same new weights; now each rank draws its own dropout masks.
            ranks.seed_everything(rank_seed(t.seed + self.fold, self.rank))
        self.step = 0
        if resume_from is not None:
            self.step, self.before = load_checkpoint(Path(resume_from), self.model, self.optimizer, self.scaler,
                                                     self.fingerprint, rank=self.rank, device=self.device)
            log.info("fold %d: resumed at step %d/%d from %s", self.fold, self.step, self.batches.total_steps,
                     resume_from)
        self.telemetry = Telemetry(tb_dir if self.rank == 0 else None, self.device)
        self.ckpt_root = Path(tempfile.mkdtemp(prefix=f"fold{self.fold}-ckpt-")) if self.rank == 0 else None

    # ------------------------------------------------------------------------------------------------ train
    def train(self, stop_at: float | None) -> bool:
        """Optimizer steps until the fold's last step (True) or the ``stop_at`` share of them (False: paused)."""
        t, total = self.cfg.train, self.batches.total_steps
        stop = total if stop_at is None else min(total, max(self.step + 1, round(total * stop_at)))
        self.start_step, self.t_start = self.step, time.perf_counter()
        self.samples = self.tokens = 0
        window_loss, window_n = torch.zeros((), device=self.device), 0
        self.ddp_model.train()
        self.precompile(stop)
        while self.step < stop:
            lr = lr_at(self.step, total, t)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = train_step(self.ddp_model, self.micro_batches(self.step), self.optimizer, self.scaler,
                                         self.params, self.autocast, t.max_grad_norm, ddp=self.world > 1,
                                         loss_fn=self.loss_fn)
            window_loss, window_n, self.step = window_loss + loss, window_n + 1, self.step + 1

            pause = self.step == stop < total
            do_log = self.step % t.log_every == 0 or self.step == total or pause
            do_ckpt = pause or (bool(t.checkpoint_every) and self.step % t.checkpoint_every == 0
                                and self.step < total)
            do_eval = bool(t.eval_every) and self.step % t.eval_every == 0 and self.step < total
            if not (do_log or do_ckpt or do_eval):
                continue
            logs = {**self.progress(), **({"paused": True} if pause else {})}
            if do_log:
                logs.update(self.throughput(), train_loss=float(window_loss) / window_n, lr=lr,
                            grad_norm=float(grad_norm))
                window_loss, window_n = torch.zeros((), device=self.device), 0
            if do_eval:
                logs.update(self.held_out.interim(self.data))
            self.telemetry.scalars(logs, self.step)
            self.send(logs, checkpoint=do_ckpt)
        return self.step == total

    def progress(self) -> dict:
        """What every report carries: where the fold is, seconds since this run's loop started, and (when counted)
        the recompilations so far (the console's ETA waits while they grow: orchestrator.cluster.eta)."""
        count = self.recompiles.count
        return {"fold": self.fold, "step": self.step, "total_steps": self.batches.total_steps,
                "start_step": self.start_step, "elapsed_s": time.perf_counter() - self.t_start,
                **({"compiles": count} if count is not None else {})}

    def precompile(self, stop: int) -> None:
        """``model.precompile`` (:mod:`trainer_core.fold.precompile`): with layers compiled for fixed batch lengths,
        one pass of each length steps ``self.step`` to ``stop`` use, longest first, before the first of them, with a
        report (``precompile_done`` of ``precompile_total``) after each length but the last; then a report at the
        start step with ``precompiled_lengths``. Nothing the steps compute changes."""
        if not (self.cfg.model.precompile and self.multiple and fastpath.compiled(self.model)) or self.step >= stop:
            return
        first = first_batch_of_each_length(lambda s: self.batches.step_rows(s, self.rank), self.data.train_ids,
                                           range(self.step, stop), self.multiple)
        lengths = sorted(set().union(*gather_objects(sorted(first), self.world)), reverse=True)  # every rank's
        own = first[max(first)]  # a rank whose steps never use a length runs these rows padded or cut to it
        batches = [resized(self.data.batch(first.get(n, own), self.tok.pad_token_id, self.device,
                                           fill_to=self.batches.micro_batch, multiple=self.multiple),
                           n, self.tok.pad_token_id) for n in lengths]
        for done, batch in enumerate(batches, 1):
            compile_passes(self.ddp_model, [batch], self.params, self.autocast, self.device, self.loss_fn,
                           ddp=self.world > 1)
            if done < len(batches):  # the console shows the phase advancing (~30 s a length, cold 9B on an H100)
                self.send({**self.progress(), "precompile_done": done, "precompile_total": len(batches)},
                          checkpoint=False)
        logs = {**self.progress(), "precompiled_lengths": len(lengths), **(warm_compile.summary(self.helpers) or {})}
        log.info("fold %d: training graphs of %d batch lengths (%s tokens) compiled in %.1f s", self.fold,
                 len(lengths), ", ".join(map(str, lengths)), logs["elapsed_s"])
        self.telemetry.scalars(logs, self.step)
        self.send(logs, checkpoint=False)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of optimizer step ``step``: [(input_ids (B, T), mask (B, T), targets)]."""
        out = []
        for idx in self.batches.step_rows(step, self.rank):
            self.samples += len(idx) * self.world
            self.tokens += int(self.data.lengths[idx].sum()) * self.world
            # Compiled layers: a short last batch is filled with ignored rows (a new batch size would recompile).
            fill_to, multiple = (self.batches.micro_batch if self.cfg.model.compile != "off" else None), self.multiple
            out.append(self.data.batch(idx, self.tok.pad_token_id, self.device, fill_to=fill_to, multiple=multiple))
        return out

    def throughput(self) -> dict:
        elapsed = time.perf_counter() - self.t_start
        return {"samples_per_s": self.samples / elapsed, "tokens_per_s": self.tokens / elapsed,
                **self.telemetry.memory()}

    def send(self, logs: dict, *, checkpoint: bool) -> None:
        """Report ``logs`` (every rank), with a checkpoint of this step written by rank 0 when asked."""
        ckpt = None
        rngs = gather_objects(rng_state(self.device), self.world) if checkpoint else None  # every rank's RNG
        if checkpoint and self.rank == 0:
            ckpt = self.ckpt_root / f"step={self.step:07d}"
            ckpt.mkdir()
            save_checkpoint(ckpt, self.model, self.optimizer, self.scaler, self.step, self.fingerprint,
                            self.totals(), rngs)
        if self.report is not None:
            self.report(logs, ckpt)  # the reporter copies the checkpoint to durable storage before returning
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)

    def totals(self) -> dict:
        """Seconds and samples of every run of this fold so far, this one included."""
        now = time.perf_counter()
        return {"train_seconds": self.before.get("train_seconds", 0.0) + now - self.t_start,
                "fold_seconds": self.before.get("fold_seconds", 0.0) + now - self.t_fold,
                "samples": self.before.get("samples", 0) + self.samples}

    # ------------------------------------------------------------------------------------------------ evaluate
    def evaluate_fold(self) -> tuple[FoldMetrics, pd.DataFrame]:
        """Every held-out row (and, with ``train.eval_tta``, the same rows swapped): the OOF table, and the fold's
        metrics, its scores with this run's steps, seconds and device."""
        run_train_seconds = time.perf_counter() - self.t_start
        done = self.totals()
        probs, tta, oof = self.held_out.oof(self.data)
        metrics = FoldMetrics(
            fold=self.fold, **held_out_scores(self.data, probs, tta), steps=self.step,
            train_seconds=done["train_seconds"],
            train_samples_per_s=done["samples"] / done["train_seconds"] if done["train_seconds"] > 0 else None,
            fold_seconds=self.totals()["fold_seconds"], last_run_seconds=time.perf_counter() - self.t_fold,
            last_run_train_seconds=run_train_seconds, resumed_from_step=self.start_step, precision=self.precision,
            device=str(self.device), world_size=self.world, fingerprint=self.fingerprint,
            recompilations=self.recompiles.count, compile_helpers=warm_compile.summary(self.helpers))
        log.info("fold %d: %s", self.fold, self.recompiles.summary())
        self.telemetry.scalars({"eval_log_loss": metrics.log_loss, "eval_accuracy": metrics.accuracy}, self.step)
        return metrics, oof

    # ------------------------------------------------------------------------------------------------ finish
    def finish(self, out_dir: Path, metrics: FoldMetrics, oof: pd.DataFrame) -> None:
        """Rank 0 writes the fold's files (``metrics.json`` last); every rank reports the final metrics."""
        if self.rank == 0:
            write_fold_files(out_dir, self.cfg, self.model, self.tok, oof, metrics.to_dict())
        if self.report is not None:
            self.report({**metrics.to_dict(), "done": True}, None)

    def close(self) -> None:
        """Whatever setup got to: the model's fast path released, the recompilation count stopped, files closed."""
        warm_compile.close(self.helpers)
        if self.speed is not None:
            self.speed.release()
        self.recompiles.stop()
        if self.telemetry is not None:
            self.telemetry.close()
        if self.ckpt_root is not None:
            shutil.rmtree(self.ckpt_root, ignore_errors=True)
