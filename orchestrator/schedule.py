"""How folds are placed on a Ray cluster: how many train at once, and in which phases (waves, a packed last wave, or
round-robin pieces). Pure functions of the config and the cluster's resources; no Ray calls."""

from __future__ import annotations

import copy

from trainer_core.config import Config

TRIAL_DRIVER_CPU = 0.0  # a trial only waits on its TorchTrainer; its workers hold the real resources


class ClusterError(RuntimeError):
    """The Ray cluster cannot run this config (e.g. a GPU config on a machine without GPUs)."""


def plan_concurrency(cfg: Config, resources: dict, n_folds: int) -> int:
    """How many folds can train at once on this cluster; ClusterError says why none can."""
    c = cfg.cluster
    if c.gpus_per_fold > 0:
        gpus = int(resources.get("GPU", 0))
        if gpus < c.gpus_per_fold:
            raise ClusterError(
                f"this config trains each fold on {c.gpus_per_fold} GPU(s) (cluster.gpus_per_fold="
                f"{c.gpus_per_fold}), but the Ray cluster has {gpus} GPU(s). Run it on a GPU machine or join a GPU "
                f"cluster with --address auto; a 4-bit Gemma-2 9B does not train on CPUs in any useful time.")
        slots = gpus // c.gpus_per_fold
        cpu_need = c.gpus_per_fold * c.cpus_per_worker + TRIAL_DRIVER_CPU
    else:
        cpu_need = c.cpu_workers_per_fold * c.cpus_per_worker + TRIAL_DRIVER_CPU
        slots = int(resources.get("CPU", 0) // cpu_need)
        if slots < 1:
            raise ClusterError(f"one CPU fold needs {cpu_need:g} CPUs (cluster.cpu_workers_per_fold x "
                               f"cluster.cpus_per_worker) but the cluster has {resources.get('CPU', 0):g}")
    slots = min(slots, int(resources.get("CPU", 0) // cpu_need) or 1)
    if c.max_concurrent_folds:
        slots = min(slots, c.max_concurrent_folds)
    return max(1, min(slots, n_folds))


def plan_phases(folds: list[int], n_gpus: int, gpus_per_fold: int, pack: bool) -> list[tuple[list[int], int]]:
    """[(folds, GPUs per fold), ...] run one after the other, minimising wall time on ``n_gpus`` GPUs.

    Full waves run ``n_gpus // gpus_per_fold`` folds at once. The remainder (five folds on four GPUs leave one) would
    otherwise run alone while the other GPUs idle; with ``pack`` it runs as a last phase whose folds split all the
    GPUs between them (data-parallel inside each fold): with perfect data-parallel scaling five folds on four GPUs
    would take 1.25 fold-times, not 2 (measured with a batch of 4: 1.91, docs/PERFORMANCE.md)."""
    if gpus_per_fold == 0 or not pack:
        return [(folds, gpus_per_fold)]
    slots = max(1, n_gpus // gpus_per_fold)
    if len(folds) % slots == 0:
        return [(folds, gpus_per_fold)]
    n_full = len(folds) - len(folds) % slots
    rest = folds[n_full:]
    share = max(gpus_per_fold, n_gpus // len(rest))
    return ([(folds[:n_full], gpus_per_fold)] if n_full else []) + [(rest, share)]


def plan_rotation(folds: list[int], slots: int) -> list[tuple[list[int], dict[int, float | None]]]:
    """Round-robin pieces for ``folds`` on ``slots`` when they do not divide evenly: ``len(folds)`` phases, phase k
    training the ``slots`` folds k, k+1, ... (cyclically), each for 1/slots of its steps. Every fold runs in exactly
    ``slots`` phases, every slot is busy in every phase, so the wall time is len(folds)/slots fold-times (1.25 for five
    on four) instead of ceil(len(folds)/slots). Returns [(phase folds, {fold: stop fraction, None = to the end})]."""
    n = len(folds)
    if slots >= n or n % slots == 0:
        return [(folds, {})]
    pieces_done = dict.fromkeys(folds, 0)
    phases = []
    for k in range(n):
        members = [folds[(k + i) % n] for i in range(slots)]
        stops: dict[int, float | None] = {}
        for f in members:
            pieces_done[f] += 1
            stops[f] = None if pieces_done[f] == slots else pieces_done[f] / slots
        phases.append((sorted(members), stops))
    return phases


def plan_fold_phases(cfg: Config, folds: list[int], resources: dict,
                     train_rows_per_fold: int | None = None) -> list[tuple[list[int], Config, dict[int, float | None]]]:
    """:func:`plan_phases` applied to a config: GPU folds get more GPUs in a packed last phase; CPU folds get more
    CPUs (threads) per worker, so the last lone fold on a 2-core machine uses both cores. With
    ``cluster.rotate_folds`` (or, left null, when :func:`rotation_is_faster` says so for GPU folds of
    ``train_rows_per_fold`` rows), :func:`plan_rotation` instead. Returns [(folds, phase config, {fold: stop
    fraction})]."""
    c = cfg.cluster
    rotate = c.rotate_folds
    if rotate is None:
        rotate = c.gpus_per_fold > 0 and train_rows_per_fold is not None and rotation_is_faster(
            cfg, len(folds), plan_concurrency(cfg, resources, len(folds)), train_rows_per_fold)
    if rotate:
        return [(f, cfg, stops) for f, stops in plan_rotation(folds, plan_concurrency(cfg, resources, len(folds)))]
    if c.gpus_per_fold > 0:
        plan = plan_phases(folds, int(resources.get("GPU", 0)), c.gpus_per_fold, c.pack_folds)
    else:
        slots = plan_concurrency(cfg, resources, len(folds))
        plan = plan_phases(folds, slots, 1, c.pack_folds)  # units = CPU-slot multiples
    out = []
    for phase_folds, units in plan:
        phase_cfg = copy.deepcopy(cfg)
        if c.gpus_per_fold > 0:
            phase_cfg.cluster.gpus_per_fold = units
        else:
            phase_cfg.cluster.cpus_per_worker = c.cpus_per_worker * units
        out.append((phase_folds, phase_cfg, {}))
    return out


def schedule_seconds(n_folds: int, slots: int, train_s: float, phase_overhead_s: float, piece_overhead_s: float,
                     ddp_speedup: float) -> tuple[float, float]:
    """(packed, rotated) wall seconds for ``n_folds`` folds of ``train_s`` training seconds each on ``slots`` one-GPU
    slots. Packing: full waves, then the remaining folds split the GPUs, training ``ddp_speedup`` times faster than on
    one. Rotation: ``n_folds`` phases, each training 1/slots of its folds. Every phase (packed) or piece (rotated) pays
    its overhead once: trial and worker start, model load, compilation, and the prediction of the folds it ends."""
    waves, rest = divmod(n_folds, slots)
    packed = waves * (phase_overhead_s + train_s) + (phase_overhead_s + train_s / ddp_speedup if rest else 0.0)
    rotated = n_folds * (piece_overhead_s + train_s / slots) if rest else packed
    return packed, rotated


def rotation_crossover_s(n_folds: int, slots: int, phase_overhead_s: float, piece_overhead_s: float,
                         ddp_speedup: float) -> float | None:
    """Training seconds per fold above which rotation beats packing (from :func:`schedule_seconds`); None when it
    never does (the folds divide evenly over the slots, or data-parallel scaling is good enough)."""
    waves, rest = divmod(n_folds, slots)
    saved_per_s = waves + 1.0 / ddp_speedup - n_folds / slots  # packed minus rotated, per training second
    if rest == 0 or saved_per_s <= 0:
        return None
    extra = n_folds * piece_overhead_s - (waves + 1) * phase_overhead_s  # rotation's extra fixed cost
    return max(0.0, extra / saved_per_s)


def prefer_rotation(n_folds: int, slots: int, train_s: float, phase_overhead_s: float, piece_overhead_s: float,
                    ddp_speedup: float) -> bool:
    """Whether rotation finishes ``n_folds`` folds of ``train_s`` training seconds sooner than packing."""
    crossover = rotation_crossover_s(n_folds, slots, phase_overhead_s, piece_overhead_s, ddp_speedup)
    return crossover is not None and train_s > crossover


# Measured on 2 x H200, compiled fast config (docs/PERFORMANCE.md, "Packing against rotation"): a phase or a piece
# costs about 40 s to start (Tune trial, Ray Train workers, imports, model load), about 20 s of compilation with the
# inductor cache of an earlier phase, and about 10 s of prediction and files. A full-length step of the fast config
# takes 0.233 s on an H200 (orchestrator.bench, same session).
PHASE_OVERHEAD_S = 70.0
STEP_S = 0.233
# A fold split over GPUs runs its batch of 4 at 1 row per GPU on 4 GPUs: 1.1x one GPU (measured, 4 x H200); over 2
# GPUs 2 rows each: about 1.37x, from the one-row and four-row step times (0.280 s, 0.480 s; not measured as DDP).
DDP_SPEEDUP = {2: 1.37}
DDP_SPEEDUP_MANY = 1.1


def rotation_is_faster(cfg: Config, n_folds: int, slots: int, train_rows_per_fold: int) -> bool:
    """Whether rotation beats packing for ``n_folds`` GPU folds of ``train_rows_per_fold`` rows on ``slots``
    one-fold slots, from the measured overheads above (:func:`prefer_rotation`). Training time per fold is estimated
    at full-length steps, so short rows make it an upper bound."""
    t = cfg.train
    steps = t.max_steps or -(-train_rows_per_fold // (t.batch_size * t.grad_accum)) * t.epochs
    rest = n_folds % slots
    if rest == 0 or slots >= n_folds:
        return False  # nothing left over to pack or rotate
    share = slots // rest  # slots each packed fold would train on
    speedup = DDP_SPEEDUP.get(share, DDP_SPEEDUP_MANY) if share > 1 else 1.0
    return prefer_rotation(n_folds, slots, steps * STEP_S, PHASE_OVERHEAD_S, PHASE_OVERHEAD_S, speedup)
