"""What DDP ranks must agree on, in a real two-process gloo group (no Ray): the memory plan's free-memory input is the
smallest over the ranks on every rank, and each rank gets a dropout seed of its own."""

import json
import os
import socket

import torch.multiprocessing as mp

from trainer_core.fold.ranks import rank_seed


def _rank(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from trainer_core.fold.ranks import min_over_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        free = [80e9, 12.5e9][rank]  # two GPUs with different free memory
        agreed = min_over_ranks(free, torch.device("cpu"), 2)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"agreed": agreed}, f)
    finally:
        dist.destroy_process_group()


def test_ranks_plan_from_the_smallest_free_memory(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2)
    agreed = [json.loads((tmp_path / f"rank{r}.json").read_text())["agreed"] for r in (0, 1)]
    assert agreed == [12.5e9, 12.5e9]


def test_each_rank_gets_its_own_reproducible_seed():
    seeds = [rank_seed(42, r) for r in range(4)]
    assert len(set(seeds)) == 4 and seeds == [rank_seed(42, r) for r in range(4)]
    assert rank_seed(43, 0) not in seeds
