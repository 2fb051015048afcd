"""How folds are placed on a Ray cluster: how many train at once, and in which phases (waves, a packed last wave, or
round-robin pieces). Pure functions of the config and the cluster's resources; no Ray calls.

A fold's place in a phase is a :class:`Placement`, handed to the fold's Ray Train run as it is: the config (what
the user asked for, and what the fold's files record) is never rewritten to carry it."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from trainer_core.config import Config

TRIAL_DRIVER_CPU = 0.0  # a trial only waits on its TorchTrainer; its workers hold the real resources


class ClusterError(RuntimeError):
    """The Ray cluster cannot run this config (e.g. a GPU config on a machine without GPUs)."""


@dataclass(frozen=True)
class Placement:
    """Where one fold trains in one phase, and how far: what its Ray Train workers hold and where it pauses."""

    gpus: int  # GPUs per fold, one Ray Train worker each; 0 = CPU workers
    cpu_workers: int  # Ray Train workers of a CPU fold (gpus == 0)
    cpus_per_worker: float  # CPUs each worker reserves; a CPU worker runs as many torch threads
    stop_at: float | None = None  # pause after this fraction of the fold's steps (a rotated piece); None = to the end

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0

    @property
    def workers(self) -> int:
        return self.gpus if self.use_gpu else self.cpu_workers

    @property
    def cpus(self) -> float:
        """CPUs one fold holds: its workers' plus its trial driver's."""
        return self.workers * self.cpus_per_worker + TRIAL_DRIVER_CPU

    def describe(self) -> str:
        return (f"{self.gpus} GPU(s) each" if self.use_gpu else
                f"{self.cpu_workers} CPU worker(s) x {self.cpus_per_worker:g} CPUs each")


Phase = dict[int, Placement]  # the folds that train together, in order, each with its placement


def base_placement(cfg: Config) -> Placement:
    """A whole fold placed as ``cluster.*`` asks."""
    c = cfg.cluster
    return Placement(gpus=c.gpus_per_fold, cpu_workers=c.cpu_workers_per_fold, cpus_per_worker=c.cpus_per_worker)


def plan_concurrency(cfg: Config, resources: dict, n_folds: int, placement: Placement | None = None) -> int:
    """How many folds placed as ``placement`` (default: as ``cluster.*`` asks) can train at once on this cluster, within
    ``cluster.max_concurrent_folds``; ClusterError says why none can."""
    p = placement or base_placement(cfg)
    if p.use_gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < p.gpus:
            raise ClusterError(
                f"this config trains each fold on {p.gpus} GPU(s) (cluster.gpus_per_fold="
                f"{p.gpus}), but the Ray cluster has {gpus} GPU(s). Run it on a GPU machine or join a GPU "
                f"cluster with --address auto; a 4-bit Gemma-2 9B does not train on CPUs in any useful time.")
        slots = gpus // p.gpus
    else:
        slots = int(resources.get("CPU", 0) // p.cpus)
        if slots < 1:
            raise ClusterError(f"one CPU fold needs {p.cpus:g} CPUs (cluster.cpu_workers_per_fold x "
                               f"cluster.cpus_per_worker) but the cluster has {resources.get('CPU', 0):g}")
    slots = min(slots, int(resources.get("CPU", 0) // p.cpus) or 1)
    if cfg.cluster.max_concurrent_folds:
        slots = min(slots, cfg.cluster.max_concurrent_folds)
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
                     train_rows_per_fold: int | None = None) -> list[Phase]:
    """:func:`plan_phases` applied to a config: GPU folds get more GPUs in a packed last phase; CPU folds get more
    CPUs (threads) per worker, so the last lone fold on a 2-core machine uses both cores. With
    ``cluster.rotate_folds`` (or, left null, when :func:`rotation_is_faster` says so for GPU folds of
    ``train_rows_per_fold`` rows), :func:`plan_rotation` instead. Returns the phases in order, each {fold:
    placement}."""
    c, base = cfg.cluster, base_placement(cfg)
    rotate = c.rotate_folds
    if rotate is None:
        rotate = base.use_gpu and train_rows_per_fold is not None and rotation_is_faster(
            cfg, len(folds), plan_concurrency(cfg, resources, len(folds)), train_rows_per_fold)
    if rotate:
        slots = plan_concurrency(cfg, resources, len(folds))
        return [{f: replace(base, stop_at=stops.get(f)) for f in phase_folds}
                for phase_folds, stops in plan_rotation(folds, slots)]
    if base.use_gpu:
        plan = plan_phases(folds, int(resources.get("GPU", 0)), base.gpus, c.pack_folds)
        return [{f: replace(base, gpus=units) for f in phase_folds} for phase_folds, units in plan]
    slots = plan_concurrency(cfg, resources, len(folds))
    plan = plan_phases(folds, slots, 1, c.pack_folds)  # units = CPU-slot multiples
    return [{f: replace(base, cpus_per_worker=base.cpus_per_worker * units) for f in phase_folds}
            for phase_folds, units in plan]


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


OVERHEADS_FILE = Path(__file__).with_name("overheads.yaml")  # the measured figures, each with its card and source


@dataclass(frozen=True)
class Overheads:
    """The measured figures :func:`rotation_is_faster` decides from (:data:`OVERHEADS_FILE` says what each is)."""

    phase_overhead_s: float
    piece_overhead_s: float
    step_s: float
    ddp_speedup: dict[int, float]  # GPUs a fold is split over -> speed-up over one GPU
    ddp_speedup_many: float  # for GPU counts ddp_speedup does not list

    def speedup(self, gpus: int) -> float:
        return 1.0 if gpus <= 1 else self.ddp_speedup.get(gpus, self.ddp_speedup_many)


def load_overheads(path: Path | None = None) -> Overheads:
    """The measured figures from ``path`` (default :data:`OVERHEADS_FILE`), each entry's ``value``."""
    path = Path(path or OVERHEADS_FILE)
    return _read_overheads(path, path.stat().st_mtime_ns)


@functools.cache  # read once per file version
def _read_overheads(path: Path, mtime_ns: int) -> Overheads:
    data = yaml.safe_load(path.read_text()) or {}
    names = [f.name for f in fields(Overheads)]
    missing = [n for n in names if not isinstance(data.get(n), dict) or "value" not in data[n]]
    if missing:
        raise ValueError(f"{path}: no value for {', '.join(missing)} (each entry: value, what, card, source)")
    values = {n: data[n]["value"] for n in names}
    values["ddp_speedup"] = {int(k): float(v) for k, v in values["ddp_speedup"].items()}
    return Overheads(**values)


def rotation_is_faster(cfg: Config, n_folds: int, slots: int, train_rows_per_fold: int) -> bool:
    """Whether rotation beats packing for ``n_folds`` GPU folds of ``train_rows_per_fold`` rows on ``slots``
    one-fold slots, from the measured overheads of :data:`OVERHEADS_FILE` (:func:`prefer_rotation`). Training time
    per fold is estimated at full-length steps, so short rows make it an upper bound."""
    t = cfg.train
    steps = t.max_steps or -(-train_rows_per_fold // (t.batch_size * t.grad_accum)) * t.epochs
    rest = n_folds % slots
    if rest == 0 or slots >= n_folds:
        return False  # nothing left over to pack or rotate
    share = slots // rest  # slots each packed fold would train on
    o = load_overheads()
    return prefer_rotation(n_folds, slots, steps * o.step_s, o.phase_overhead_s, o.piece_overhead_s, o.speedup(share))


def phase_shares(phases: list[Phase]) -> list[list[float]]:
    """For each phase, the share of a whole fold each of its folds trains there: 1.0 without rotation, the piece
    between the previous stop and this one (``stop_at``; None = to the end) with it."""
    done: dict[int, float] = {}
    out = []
    for phase in phases:
        shares = []
        for fold, placement in phase.items():
            stop = 1.0 if placement.stop_at is None else placement.stop_at
            shares.append(max(0.0, stop - done.get(fold, 0.0)))
            done[fold] = stop
        out.append(shares)
    return out
