"""Benchmark fold training: the seed notebook's setup against this project's, same process, same batches.

Builds the config's architecture with random weights (``model.random_config``; nothing is downloaded) and times
(0) the seed notebook's exact path (``seed-hf``: Hugging Face Trainer with the notebook's TrainingArguments,
full-length rows), (a) the seed's setup - fp16, the library's default attention, reentrant checkpointing through every
layer, batch 4, 8-bit AdamW - and (b) the project's fold training step as configured (bf16 where the card has it, no
backward through frozen layers, recomputation only if free memory demands it), on full-length rows and on an arena-like
length mix.
Optionally (c) the project's setup squeezed into a smaller card (``--budget-gib 24``). Prints one table, the ratio
line, and a numerics check of (b) against (a). Not a test: figures go into docs/PERFORMANCE.md with the card.

Examples::

    python -m orchestrator.bench --config configs/smoke.yaml                      # CPU, seconds
    python -m orchestrator.bench --config configs/gemma2_9b_qlora.yaml --steps 10 --budget-gib 24 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from trainer_core.config import ConfigError, apply_overrides, load_config, parse_override, validate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="config whose architecture and training setup to time")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per measurement (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement (default 2)")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="also time the project's setup capped at this much GPU memory (e.g. 24 for a 24 GB card)")
    p.add_argument("--also", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also time the project's setup with these config overrides, and check its numerics (logits, "
                        "loss, gradients) against it (repeatable; e.g. model.compile=true, "
                        "model.attn_implementation=flex_attention, train.batch_size=8, model.fp8_backward=true)")
    p.add_argument("--profile", action="store_true",
                   help="also profile the project's full-length step (torch.profiler): device-busy share of each "
                        "step and the top operators by device time")
    p.add_argument("--no-mixed", action="store_true", help="skip the variable-length (arena-like) measurement")
    p.add_argument("--no-seed", action="store_true", help="skip the seed baseline (then no ratio is printed)")
    p.add_argument("--no-seed-hf", action="store_true",
                   help="skip the seed notebook's exact path (seed-hf: Hugging Face Trainer with the notebook's "
                        "TrainingArguments, full-length rows only)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as for orchestrator.cv")
    return p


def fmt(v, spec: str) -> str:
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def print_table(rows: list[dict], device_name: str) -> None:
    head = (f"{'setup':<10} {'prec':<5} {'micro x acc':>11} {'samples/s':>10} {'tokens/s':>10} {'s/step':>7} "
            f"{'peak GiB':>9} {'MFU':>6} {'mixed s/s':>10} {'pad waste':>9}  checkpointing")
    print(f"device: {device_name}")
    print(head)
    for r in rows:
        print(f"{r['setup']:<10} {r['precision']:<5} {str(r['micro_batch']) + ' x ' + str(r['grad_accum']):>11} "
              f"{r['samples_per_s']:>10.2f} {r['tokens_per_s']:>10.0f} {r['s_per_step']:>7.3f} "
              f"{fmt(r.get('peak_gib'), '9.1f')} {fmt(r.get('mfu'), '6.1%')} "
              f"{fmt(r.get('mixed_samples_per_s'), '10.2f')} {fmt(r.get('mixed_padding_waste'), '9.1%')}  "
              f"{r['checkpointing']}")


def short_error(e: Exception) -> str:
    """``Type: first line of the message`` (at most 300 characters), for a setup recorded as failed."""
    first = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def numerics_text(num: dict) -> str:
    grads = (f", gradients {num['rel_grad_diff']:.2%} apart ({num['grad_tensors']} shared trained tensors)"
             if "rel_grad_diff" in num else "")
    return (f"max |logit diff| {num['max_abs_logit_diff']:.4g} ({num['rel_logit_diff']:.2%} of max |logit|), "
            f"loss {num['loss_b']:.5f} vs {num['loss_a']:.5f} ({num['rel_loss_diff']:.2%}){grads}")


def main(argv: list[str] | None = None) -> int:
    # Variable-length batches fragment CUDA's cache without it. Set before torch is imported (here, not at this
    # module's import): part of the option is read when torch loads.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    from orchestrator.perf.seed_hf import run_seed_hf
    from orchestrator.perf.step_bench import (
        compare_numerics,
        free_cuda,
        our_setup,
        profile_setup,
        run_setup,
        seed_setup,
    )

    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after flags
    try:
        cfg = load_config(args.config, [*args.overrides, "model.init=random"])
        validate(cfg)
        variants = []
        for spec in args.also:
            overrides = dict(parse_override(kv) for kv in spec.split(","))
            validate(apply_overrides(cfg, overrides))
            variants.append((spec, overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    seed = seed_setup(cfg)
    ours = our_setup(cfg, device)
    if device.type == "cpu":
        # fp16 autocast and loss scaling are GPU features; on the CPU both setups run fp32 (the comparison then
        # measures recomputation, frozen-layer backward and length grouping only).
        seed.precision = "fp32"
    variant_setups = [our_setup(cfg, device, overrides, f"ours+{spec}") for spec, overrides in variants]
    plan = [] if args.no_seed else [(seed, None, not args.no_mixed)]
    plan.append((ours, None, not args.no_mixed))
    plan += [(v, None, not args.no_mixed) for v in variant_setups]
    if args.budget_gib:
        capped = our_setup(cfg, device)
        capped.name = f"ours@{args.budget_gib:g}G"
        plan.append((capped, args.budget_gib, False))
    rows = []
    if not args.no_seed_hf:
        try:
            rows.append(run_seed_hf(cfg, device, steps=args.steps, warmup=args.warmup))
        except (torch.OutOfMemoryError, RuntimeError, ValueError) as e:
            free_cuda(device)
            rows.append({"setup": "seed-hf", "failed": True, "oom": isinstance(e, torch.OutOfMemoryError),
                         "error": short_error(e)})
        free_cuda(device)
        print(json.dumps(rows[-1]), flush=True)
    for setup, budget, mixed in plan:
        try:
            rows.append(run_setup(cfg, setup, device, steps=args.steps, warmup=args.warmup, budget_gib=budget,
                                  mixed=mixed))
        except (torch.OutOfMemoryError, RuntimeError, ValueError) as e:  # recorded; the other setups still run
            free_cuda(device)
            rows.append({"setup": setup.name, "oom": isinstance(e, torch.OutOfMemoryError), "failed": True,
                         "budget_gib": budget, "error": short_error(e)})
        print(json.dumps(rows[-1]), flush=True)  # each row as soon as it exists
    ok = {r["setup"]: r for r in rows if not r.get("failed")}
    print_table(list(ok.values()), device_name)
    for r in rows:
        if r.get("failed"):
            print(f"{r['setup']}: failed ({r['error']})")
    result = {"device": device_name, "config": str(args.config), "overrides": args.overrides, "rows": rows}
    if "seed" in ok and "ours" in ok:
        result["ratio"] = ok["ours"]["samples_per_s"] / ok["seed"]["samples_per_s"]
        print(f"samples/s ratio vs seed (same call, {device_name}): {result['ratio']:.2f}")
        if "mixed_samples_per_s" in ok["seed"]:
            result["mixed_ratio"] = ok["ours"]["mixed_samples_per_s"] / ok["seed"]["mixed_samples_per_s"]
            print(f"samples/s ratio vs seed on the arena-like length mix (same call, {device_name}): "
                  f"{result['mixed_ratio']:.2f}")
    if "seed-hf" in ok and "ours" in ok:
        result["ratio_seed_hf"] = ok["ours"]["samples_per_s"] / ok["seed-hf"]["samples_per_s"]
        print(f"samples/s ratio vs seed-hf, the notebook's Trainer path (same call, {device_name}): "
              f"{result['ratio_seed_hf']:.2f}")
    if "seed" in ok and "ours" in ok:
        num = compare_numerics(cfg, seed, ours, device)
        result["numerics"] = num
        print(f"numerics, ours vs seed setup (same weights, one batch): {numerics_text(num)}")
    for variant in variant_setups:
        if "ours" not in ok or variant.name not in ok:
            continue
        try:
            num = compare_numerics(cfg, ours, variant, device, grads=True)
        except (RuntimeError, ValueError) as e:
            free_cuda(device)
            num = {"error": short_error(e)}
        ok[variant.name]["numerics_vs_ours"] = num
        print(f"{variant.name}: {ok[variant.name]['samples_per_s'] / ok['ours']['samples_per_s']:.2f}x ours; "
              f"numerics vs ours: {num['error'] if 'error' in num else numerics_text(num)}", flush=True)
    if args.profile:
        try:
            prof = profile_setup(cfg, ours, device)
            result["profile"] = {k: v for k, v in prof.items() if k != "table"}
            busy = prof["device_busy_s_per_step"]
            print(f"profile of {prof['setup']} (micro-batch {prof['micro_batch']}): {prof['s_per_step']:.3f} s/step"
                  + (f", device busy {busy:.3f} s ({busy / prof['s_per_step']:.0%})" if busy is not None else ""))
            print(prof["table"])
        except (RuntimeError, ValueError) as e:
            free_cuda(device)
            print(f"profile failed: {short_error(e)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
