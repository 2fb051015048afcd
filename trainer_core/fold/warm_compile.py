"""A first fold's training graphs compiled by helper processes while the fold loads its model
(``cluster.compile_helpers``).

On a fresh machine a fold's first steady step waits for inductor: ~30 s of CPU work per batch length, one length after
another, after the model has loaded (docs/PERFORMANCE.md, sessions 15-20). A decoder layer's graph depends on the
layer's kind (frozen or adapted, sliding or global attention, the first adapted layer, the pooled top layer), its sizes
and the batch's shape, not on its weights nor on the model's layer count. So once the fold knows its batch lengths,
before it loads its model, helpers each build a small replica (one or two layers of every kind, random weights, the
fold's quantization, LoRA and fast path) and run the fold's first micro-batch of some lengths through it, forward and
backward, side by side. Their graphs land in the caches every process of the machine reads (``cluster.compile_cache``:
FX graphs, AOT autograd graphs, Triton kernels; keyed alike in every process, fastpath.compile.stable_cache_keys), and
the fold's own precompilation (:mod:`trainer_core.fold.precompile`) reads them back instead of compiling them.

Best effort, never a different result: the fold runs the graphs it would compile itself, read back only when their
keys match (a placement the replica did not guess, e.g. recomputed layers on a small card, compiles in the fold as
before); a helper that fails or runs late changes nothing but time. The fold waits for its helpers before placing its
model (their memory is free by then); folds of one config on a machine share one set (a lock); helpers die with it.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer_core.config import Config, config_from_dict, pad_multiple
from trainer_core.fold.replica import replica_architecture, replica_config, replica_ids

log = logging.getLogger(__name__)

WAIT_S = 900.0  # a helper still compiling after this is stopped; the fold then compiles what is missing itself
AUTO_MIN_GPU_GIB = 40  # auto starts helpers on cards this large: they hold GiBs while the fold loads its model
NICE = 10  # the helpers' CPU priority below the fold's (at most 19; a Ray worker runs at 15): they yield the cores


def helper_count(cfg: Config, lengths: int, device: torch.device, world: int) -> int:
    """Helpers a fold with ``lengths`` batch lengths starts: ``cluster.compile_helpers`` (auto: on a GPU of at least
    :data:`AUTO_MIN_GPU_GIB` one per length, at most a quarter of the CPUs; none on a CPU or a smaller card, where
    their memory beside the loading model could run out), never past the lengths; none unless layers compile per
    length with ``model.precompile``, for a pairwise head, or in a fold of several ranks (each would build replicas)."""
    m, setting = cfg.model, cfg.cluster.compile_helpers
    if not (m.compile == "on" and pad_multiple(m) and m.precompile) or m.head == "pairwise" or world > 1:
        return 0
    if setting == "auto":
        setting = max(1, _cpus() // 4) if device.type == "cuda" and _gpu_gib(device) >= AUTO_MIN_GPU_GIB else 0
    return max(0, min(int(setting), lengths))


def _lock_path(cfg: Config) -> Path:
    root = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    return root / f"compile-helpers-{key}.lock"


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the fold's process ends (Linux's PR_SET_PDEATHSIG), set here: a ``preexec_fn`` is unsafe in a
    process with threads (a Ray worker); an exit now if it already ended."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit(1)


def _lower_priority(pid: int) -> None:
    """:data:`NICE` below this process, set from here as the helper starts (its compile workers inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICE))
    except OSError:  # already ended: its log tells why
        pass


def _gpu_gib(device: torch.device) -> float:
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class Helpers:
    """The helpers of one fold (none when another fold of the machine holds the lock: :meth:`wait` waits for it)."""

    lock: object
    procs: list[subprocess.Popen] = field(default_factory=list)
    folder: Path | None = None
    started: float = field(default_factory=time.perf_counter)
    owner: bool = True
    done: dict | None = None  # what :meth:`wait` found

    def wait(self, timeout: float = WAIT_S) -> dict:
        """Until every helper ended (or ``timeout``: the rest are stopped) and the lock is free; what they did, for
        the fold's metrics: ``{"compile_helpers": n, "compile_helpers_s": seconds, "compile_helpers_failed": k}``."""
        end = self.started + timeout
        failed = 0
        for i, p in enumerate(self.procs):
            try:
                p.wait(timeout=max(1.0, end - time.perf_counter()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            failed += p.returncode != 0
            if p.returncode != 0 and self.folder is not None:
                tail = (self.folder / f"helper{i}.log").read_text(errors="replace")[-2000:]
                log.warning("compile helper %d ended with %s: %s", i, p.returncode, tail)
        if not self.owner:  # another fold's helpers: their graphs are in the cache once its lock is free
            fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.close()
        seconds = round(time.perf_counter() - self.started, 1)
        self.done = {"compile_helpers": len(self.procs), "compile_helpers_s": seconds, "compile_helpers_failed": failed}
        log.info("compile helpers: %s", self.done)
        return self.done

    def close(self) -> None:
        """Helpers still running stopped, their folder (batches, logs) removed, the lock released. Idempotent."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        if not self.lock.closed:
            self.lock.close()  # releases the flock


def start(cfg: Config, batches: list[tuple], *, pad_id: int, device: torch.device, helpers: int) -> Helpers | None:
    """Start ``helpers`` processes compiling ``batches`` (the fold's first micro-batch of each length, longest first,
    on the CPU) on replicas of ``cfg``'s model; None when there is nothing to do."""
    spec = replica_architecture(cfg, pad_id) if helpers and batches else None
    if spec is None:
        return None
    replica = replica_config(cfg, *spec)
    lock = open(_lock_path(replica), "w")  # noqa: SIM115 - held until the helpers end (Helpers.close)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("another fold of this machine is compiling the same graphs: waiting for it before placing")
        return Helpers(lock, owner=False)
    out = Helpers(lock, folder=Path(tempfile.mkdtemp(prefix="compile-helpers-")))
    try:
        (out.folder / "config.json").write_text(json.dumps(replica.to_dict()))
        # the cores shared out, two left to the fold (its model load ran 35 s longer beside helpers using all 16);
        # below its priority too (_lower_priority)
        env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (_cpus() - 2) // helpers))}
        for i in range(helpers):
            share = batches[i::helpers]
            torch.save([(replica_ids(b[0], pad_id), *b[1:]) for b in share], out.folder / f"batches{i}.pt")
            with open(out.folder / f"helper{i}.log", "w") as log_file:
                out.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "trainer_core.fold.warm_compile", str(out.folder), str(i), str(device),
                     str(pad_id), str(os.getpid())], stdout=log_file, stderr=subprocess.STDOUT, env=env))
            _lower_priority(out.procs[-1].pid)
    except BaseException:
        out.close()
        raise
    log.info("%d compile helpers started for %d batch lengths", helpers, len(batches))
    return out


def wait(helpers: Helpers | None) -> None:
    """:meth:`Helpers.wait`, for a fold that may have none."""
    if helpers is not None:
        helpers.wait()


def summary(helpers: Helpers | None) -> dict | None:
    """What the helpers did, for the fold's ``metrics.json`` (None: none ran)."""
    return None if helpers is None else helpers.done


def close(helpers: Helpers | None) -> None:
    if helpers is not None:
        helpers.close()


def start_for_fold(cfg: Config, fold: int, data, *, pad_id: int, device: torch.device, precision: str,
                   world: int) -> Helpers | None:
    """The helpers of a fold about to load its model (``data``: its ``FoldData``): the first micro-batch of each
    length the fold's steps will use, in the micro-batches the config asks for (a memory plan that splits them later
    makes other shapes, which the fold compiles itself), shared out over :func:`helper_count` helpers."""
    from trainer_core.fastpath import Placement
    from trainer_core.fold.data import plan_batches, rank_micro_batch
    from trainer_core.fold.precompile import first_batch_of_each_length

    if not helper_count(cfg, 1, device, world):
        return None
    multiple = pad_multiple(cfg.model)
    provisional = Placement(device=device, precision=precision, seq_len=0, recompute="off",
                            micro_batch=rank_micro_batch(cfg, fold, world), grad_accum=cfg.train.grad_accum)
    schedule = plan_batches(cfg, fold, data.lengths, provisional, world)
    first = first_batch_of_each_length(lambda s: schedule.step_rows(s, 0), data.train_ids,
                                       range(schedule.total_steps), multiple)
    batches = [data.batch(first[n], pad_id, torch.device("cpu"), fill_to=schedule.micro_batch, multiple=multiple)
               for n in sorted(first, reverse=True)]
    return start(cfg, batches, pad_id=pad_id, device=device, helpers=helper_count(cfg, len(first), device, world))


def run_helper(folder: Path, index: int, device: torch.device, pad_id: int) -> None:
    """One helper: the replica built and placed as the fold builds its model, then one forward and backward pass of
    each of its batches (:func:`trainer_core.fold.precompile.compile_passes`)."""
    from trainer_core import fastpath
    from trainer_core.fold.data import rank_micro_batch
    from trainer_core.fold.distill import fold_loss
    from trainer_core.fold.precompile import compile_passes, moved
    from trainer_core.model.build import build_model, trainable_parameters
    from trainer_core.model.precision import make_autocast, resolve_precision

    cfg = config_from_dict(json.loads((folder / "config.json").read_text()))
    batches = [moved(b, device) for b in torch.load(folder / f"batches{index}.pt")]
    precision = resolve_precision(cfg.train.precision, device)
    t0 = time.perf_counter()
    fastpath.prepare_load(cfg.model)
    model = build_model(cfg.model, cfg.lora, pad_token_id=pad_id, precision=precision, device=device,
                        seed=cfg.train.seed)
    placement = fastpath.place(cfg, model, device=device, precision=precision,
                               seq_len=max(b[0].shape[1] for b in batches), grad_accum=cfg.train.grad_accum,
                               micro_batch=rank_micro_batch(cfg, 0, 1), budget_gib=cfg.train.memory_budget_gib)
    speed = fastpath.apply(model, cfg, placement)
    built = time.perf_counter() - t0
    loss_fn = fold_loss(cfg.train, soft_labels=isinstance(batches[0][2], tuple))
    model.train()
    for batch in batches:
        t1 = time.perf_counter()
        compile_passes(model, [batch], trainable_parameters(model), make_autocast(precision, device), device, loss_fn)
        print(f"helper {index}: length {batch[0].shape[1]} compiled in {time.perf_counter() - t1:.1f} s", flush=True)
    speed.release()
    print(f"helper {index}: replica built in {built:.1f} s; done in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    _die_with_parent(int(sys.argv[5]))
    logging.basicConfig(level=logging.WARNING)
    run_helper(Path(sys.argv[1]), int(sys.argv[2]), torch.device(sys.argv[3]), int(sys.argv[4]))
