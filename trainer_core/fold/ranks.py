"""What the ranks of one fold's ``torch.distributed`` group share: who is who, seeds of their own, and collectives that
gather or agree on values (every rank must call a collective, in the same order)."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


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


def rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for each rank, derived from the fold's seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def gather_objects(obj, world: int) -> list:
    """``obj`` of every rank, in rank order, on every rank (a collective: every rank calls it)."""
    if world == 1:
        return [obj]
    parts: list = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def gather_rows(local: np.ndarray, local_idx: np.ndarray, n: int, world: int) -> np.ndarray:
    """Rank-sharded predictions back into one (n, 3) array on every rank."""
    if world == 1:
        return local
    out = np.zeros((n, 3))
    for idx, p in gather_objects((local_idx, local), world):
        out[idx] = p
    return out


def min_over_ranks(value: float, device: torch.device, world: int) -> float:
    """The smallest ``value`` of all ranks (a collective: every rank calls it); ``value`` itself with one rank."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())
