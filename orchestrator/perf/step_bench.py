"""Time the seed notebook's training setup against this project's, on the same synthetic batches, in one process.

Both setups build the config's architecture with the same random weights (no download) and run the shared
``trainer_core.fold.step.train_step``. Figures: samples/s, real (non-pad) tokens/s, peak GPU memory, model-FLOPs
utilisation (MFU), and the ratio ours / seed. A variable-length mix resembling arena data measures padding waste.
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer_core import fastpath
from trainer_core.config import Config, apply_overrides, pad_multiple
from trainer_core.data.batching import collate, epoch_batches, padding_waste
from trainer_core.fastpath.recompiles import RecompileCounter
from trainer_core.fold.optim import build_optimizer
from trainer_core.fold.step import train_step
from trainer_core.model.build import build_model, decoder_layer_count, trainable_parameters
from trainer_core.model.memory import apply_budget
from trainer_core.model.precision import make_autocast, resolve_precision

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device-name fragment, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


@dataclass
class Setup:
    name: str
    precision: str            # resolved: bf16 / fp16 / fp32
    checkpointing: str        # reentrant / on / off / auto
    attn_implementation: str | None
    compile: str              # off / on / dynamic
    batch_size: int
    grad_accum: int
    group_by_length: bool
    optimizer: str
    overrides: dict = field(default_factory=dict)  # dotted config overrides this setup was built with


def seed_setup(cfg: Config) -> Setup:
    """The seed notebook: fp16, the library's default attention, peft's default (reentrant) checkpointing through
    every layer, batch 4, 8-bit AdamW, no length grouping, nf4 weights dequantized at every call, every position of
    the top layer computed."""
    return Setup("seed", "fp16", "reentrant", None, "off", 4, 1, False, "adamw_8bit",
                 {"model.dequant_cache": "off", "model.pooled_last_layer": False})


def our_setup(cfg: Config, device: torch.device, overrides: dict | None = None, name: str = "ours") -> Setup:
    """The project's fold training setup as ``cfg`` (plus ``overrides``, a variant to compare) configures it."""
    overrides = dict(overrides or {})
    c = apply_overrides(cfg, overrides)
    return Setup(name, resolve_precision(c.train.precision, device), c.model.gradient_checkpointing,
                 c.model.attn_implementation, c.model.compile, c.train.batch_size, c.train.grad_accum, True,
                 c.train.optimizer, overrides)


def setup_config(cfg: Config, setup: Setup) -> Config:
    """``cfg`` as ``setup`` runs it: its overrides applied, its attention, compilation and recomputation in the model
    section."""
    out = apply_overrides(cfg, setup.overrides)
    out.model.attn_implementation, out.model.compile = setup.attn_implementation, setup.compile
    out.model.gradient_checkpointing = setup.checkpointing
    return out


def arena_like_lengths(n: int, max_length: int, seed: int = 0) -> np.ndarray:
    """Token counts resembling arena rows: log-normal, median ~0.4 * max_length, a tail cut at max_length."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(0.4 * max_length), 0.8, size=n), 16, max_length).astype(int)


def model_flops_per_token(config, n_trained_layers: int, seq_len: int) -> float:
    """Useful FLOPs per token: forward through every layer plus the activation-gradient backward through the trained
    layers (LoRA weight gradients are negligible). Same definition for both setups, so MFU ratio = speed ratio."""
    h, inter = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * hd
    kv = getattr(config, "num_key_value_heads", config.num_attention_heads) * hd
    matmul = h * q + 2 * h * kv + q * h + 3 * h * inter
    per_layer = 2 * matmul + 4 * seq_len * q  # projections + attention scores/values (causal mask not discounted)
    return per_layer * (config.num_hidden_layers + n_trained_layers)


def _synthetic_batches(lengths: np.ndarray, batch: int, group: bool, vocab: int, device: torch.device,
                       n_batches: int, seed: int, multiple: int = 0) -> list:
    rng = np.random.default_rng(seed)
    plan = epoch_batches(lengths, batch, 1, seed, 0, group)[:n_batches]
    out = []
    for idx in plan:
        ids = [rng.integers(4, vocab, size=int(lengths[i])).tolist() for i in idx]
        input_ids, mask = collate(ids, 0, device, multiple)  # padded as a fold pads (model.length_bucket)
        out.append((input_ids, mask, torch.as_tensor(rng.integers(0, 3, size=len(idx)), device=device)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_for(cfg: Config, setup: Setup, device: torch.device, seq_len: int, budget_gib: float | None):
    """(model, params, optimizer, scaler, micro, accum, plan_text) for a setup, built with the calls a fold makes
    (``trainer_core.fold.loop.FoldRun.setup``): ``fastpath.prepare_load``, the plain ``build_model``,
    ``fastpath.place`` for ``seq_len``-token rows and ``fastpath.apply``; ``cfg`` is the setup's own
    (:func:`setup_config`). ``fastpath.release(model)`` when done with it."""
    torch.manual_seed(cfg.train.seed)
    fastpath.prepare_load(cfg.model)
    model = build_model(cfg.model, cfg.lora, pad_token_id=0, precision=setup.precision, device=device,
                        seed=cfg.train.seed)
    placement = fastpath.place(cfg, model, device=device, precision=setup.precision, seq_len=seq_len,
                               micro_batch=setup.batch_size, grad_accum=setup.grad_accum, budget_gib=budget_gib)
    speed = fastpath.apply(model, cfg, placement)
    plan_text = placement.reason + (f"; {speed.cache_note}" if speed.cache_note else "")
    model.train()  # recomputation and dropout act only in training mode, as in a fold
    params = trainable_parameters(model)
    tcfg = copy.deepcopy(cfg.train)
    tcfg.optimizer = setup.optimizer
    optimizer = build_optimizer(params, tcfg, device)
    scaler = torch.amp.GradScaler(device.type) if setup.precision == "fp16" else None
    return model, params, optimizer, scaler, placement.micro_batch, placement.grad_accum, plan_text


def time_steps(model, params, optimizer, scaler, batches: list, accum: int, autocast, warmup: int,
               device: torch.device) -> tuple[float, int, int, int]:
    """(seconds, steps, samples, real tokens) over the timed steps (after ``warmup`` untimed ones)."""
    steps = [batches[i:i + accum] for i in range(0, len(batches) - accum + 1, accum)]
    for s in steps[:warmup]:
        train_step(model, s, optimizer, scaler, params, autocast, 1.0)
    _sync(device)
    timed = steps[warmup:]
    t0 = time.perf_counter()
    for s in timed:
        train_step(model, s, optimizer, scaler, params, autocast, 1.0)
    _sync(device)
    secs = time.perf_counter() - t0
    samples = sum(len(m[2]) for s in timed for m in s)
    tokens = sum(int(m[1].sum()) for s in timed for m in s)
    return secs, len(timed), samples, tokens


def run_setup(cfg: Config, setup: Setup, device: torch.device, *, steps: int, warmup: int,
              budget_gib: float | None = None, mixed: bool = True) -> dict:
    """Benchmark one setup at full length (max_length every row) and on the arena-like length mix."""
    cfg = setup_config(cfg, setup)
    seq_len = cfg.data.max_length
    start_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        apply_budget(device, budget_gib)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    recompiles = RecompileCounter().start()
    model, params, optimizer, scaler, micro, accum, plan_text = build_for(cfg, setup, device, seq_len, budget_gib)
    autocast = make_autocast(setup.precision, device)
    vocab = model.config.vocab_size
    n_trained = decoder_layer_count(model) - cfg.lora.freeze_layers
    n_batches = (steps + warmup) * accum
    row = {"setup": setup.name, "precision": setup.precision, "checkpointing": plan_text, "start_gib": start_gib,
           "budget_gib": budget_gib,
           "attention": setup.attn_implementation or "default", "micro_batch": micro, "grad_accum": accum}
    full = _synthetic_batches(np.full(n_batches * micro, seq_len), micro, False, vocab, device, n_batches, 1)
    secs, n, samples, tokens = time_steps(model, params, optimizer, scaler, full, accum, autocast, warmup, device)
    row.update(samples_per_s=samples / secs, tokens_per_s=tokens / secs, s_per_step=secs / n)
    flops = model_flops_per_token(model.config, n_trained, seq_len)
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda"
                 and k in torch.cuda.get_device_name(device)), None)
    row["mfu"] = tokens / secs * flops / peak if peak else None
    if mixed:
        lengths = arena_like_lengths(4096, seq_len)
        batches = _synthetic_batches(lengths, micro, setup.group_by_length, vocab, device, n_batches, 2,
                                     pad_multiple(cfg.model))
        row["mixed_padding_waste"] = padding_waste([m[1].sum(1).tolist() for m in batches])
        secs, n, samples, tokens = time_steps(model, params, optimizer, scaler, batches, accum, autocast, warmup,
                                              device)
        row.update(mixed_samples_per_s=samples / secs, mixed_tokens_per_s=tokens / secs)
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    recompiles.stop()
    row["recompilations"] = recompiles.count  # as a fold's metrics.json counts them
    fastpath.release(model)
    del model, optimizer, params, scaler, full
    if mixed:
        del batches
    free_cuda(device)
    return row


def profile_setup(cfg: Config, setup: Setup, device: torch.device, *, steps: int = 3, warmup: int = 2,
                  top: int = 25) -> dict:
    """Where a full-length training step spends its time: ``torch.profiler`` over ``steps`` steps after ``warmup``.
    Returns wall and device-busy seconds per step and the ``top`` operators by self device time (a table string)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = setup_config(cfg, setup)
    model, params, optimizer, scaler, micro, accum, _ = build_for(cfg, setup, device, cfg.data.max_length, None)
    autocast = make_autocast(setup.precision, device)
    n = (steps + warmup) * accum
    batches = _synthetic_batches(np.full(n * micro, cfg.data.max_length), micro, False, model.config.vocab_size,
                                 device, n, 1)
    time_steps(model, params, optimizer, scaler, batches[:warmup * accum], accum, autocast, 0, device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        secs, n_steps, _, _ = time_steps(model, params, optimizer, scaler, batches[warmup * accum:], accum, autocast,
                                         0, device)
    events = prof.key_averages()
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # device busy time: the union-free sum of kernel durations (one stream in these models)
    busy_us = sum(e.time_range.elapsed_us() for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA) if cuda else None
    out = {"setup": setup.name, "micro_batch": micro, "s_per_step": secs / n_steps,
           "device_busy_s_per_step": busy_us / 1e6 / n_steps if cuda else None,
           "table": events.table(sort_by=sort_key, row_limit=top, max_name_column_width=60)}
    fastpath.release(model)
    del model, optimizer, params, scaler, batches
    free_cuda(device)
    return out


def free_cuda(device: torch.device) -> None:
    """Release what a finished setup held, so the next one starts from an empty card."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def compare_numerics(cfg: Config, a: Setup, b: Setup, device: torch.device, rows: int = 4,
                     grads: bool = False) -> dict:
    """Logits and loss of setup ``b`` against setup ``a`` on one batch with identical weights (eval mode: no dropout).
    ``grads``: also the loss's gradients on the trained tensors both setups share (name and shape), as
    ``rel_grad_diff`` = |g_b - g_a| / |g_a| over all of them (a backward-only change such as model.fp8_backward shows
    there, not in the logits)."""
    out = {}
    seq_len = min(cfg.data.max_length, 256)
    for setup in (a, b):
        model, *_ = build_for(setup_config(cfg, setup), setup, device, seq_len, None)
        model.eval()
        batch = _synthetic_batches(arena_like_lengths(rows, seq_len, 3), rows, False, model.config.vocab_size,
                                   device, 1, 3)[0]
        with torch.set_grad_enabled(grads), make_autocast(setup.precision, device)():
            logits = model(input_ids=batch[0], attention_mask=batch[1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, batch[2])
        if grads:
            loss.backward()
        g = {n: p.grad.float().cpu() for n, p in model.named_parameters() if grads and p.grad is not None}
        out[setup.name] = (logits.detach().cpu(), loss.item(), g)
        fastpath.release(model)
        del model, logits, loss
        gc.collect()
    (la, lossa, ga), (lb, lossb, gb) = out[a.name], out[b.name]
    scale = float(la.abs().max()) or 1.0
    result = {"max_abs_logit_diff": float((la - lb).abs().max()), "logit_scale": scale,
              "rel_logit_diff": float((la - lb).abs().max()) / scale,
              "loss_a": lossa, "loss_b": lossb, "rel_loss_diff": abs(lossa - lossb) / max(abs(lossa), 1e-12)}
    shared = [n for n in ga if n in gb and ga[n].shape == gb[n].shape]
    norm = sum(float(ga[n].square().sum()) for n in shared) ** 0.5
    if shared and norm > 0:
        result["rel_grad_diff"] = sum(float((gb[n] - ga[n]).square().sum()) for n in shared) ** 0.5 / norm
        result["grad_tensors"] = len(shared)
    return result
