"""model.precompile (trainer_core.fold.precompile): the batch lengths a fold's steps will use, each compiled once
before the first step by a pass that changes nothing the steps then compute. The whole fold with compiled layers is in
tests/trainer_core/fastpath/test_recompiles.py (no compilation after the passes)."""

import numpy as np
import pytest
import torch

from tests.conftest import CONFIGS
from tests.trainer_core.fastpath.fast_model import build_fast
from trainer_core.config import load_config
from trainer_core.data.batching import collate
from trainer_core.fold.precompile import compile_passes, first_batch_of_each_length, resized
from trainer_core.fold.step import train_step
from trainer_core.model.build import trainable_parameters
from trainer_core.model.precision import make_autocast


def test_each_length_the_steps_use_maps_to_its_first_batch():
    ids = [[1] * n for n in (40, 300, 700, 90, 1000, 260)]
    plan = {0: [np.array([0, 3])], 1: [np.array([1, 0])], 2: [np.array([5, 3]), np.array([2])], 3: [np.array([4])]}
    first = first_batch_of_each_length(plan.__getitem__, ids, range(0, 4), multiple=256)
    assert {k: v.tolist() for k, v in first.items()} == {256: [0, 3], 512: [1, 0], 768: [2], 1024: [4]}
    # only the steps still to come (a resumed fold), and the rounding of pairwise rows: the longer side counts
    assert sorted(first_batch_of_each_length(plan.__getitem__, ids, range(1, 3), multiple=256)) == [512, 768]
    pairs = [([1] * 10, [1] * 300), ([1] * 20, [1] * 5)]
    assert list(first_batch_of_each_length(lambda s: [np.array([0, 1])], pairs, range(1), 256)) == [512]


def test_a_batch_is_padded_or_cut_to_a_length():
    input_ids, mask = collate([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    labels = torch.tensor([1, 2])
    longer = resized((input_ids, mask, labels), 6, pad_id=0)
    assert longer[0].tolist() == [[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0]]
    assert longer[1].tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]] and longer[2] is labels
    shorter = resized((input_ids, mask, labels), 2, pad_id=0)
    assert shorter[0].tolist() == [[5, 6], [8, 0]] and shorter[1].tolist() == [[1, 1], [1, 0]]


@pytest.mark.parametrize("soft", [False, True])
def test_the_passes_leave_weights_gradients_and_random_state_as_they_were(soft):
    """The passes draw dropout masks (the random state moves without fork_rng) and compute gradients; afterwards the
    weights, the random state and the (absent) gradients are those from before, so the first step computes exactly
    what it computes without them."""
    from trainer_core.fold.distill import distill_loss

    cfg = load_config(CONFIGS / "smoke.yaml", ["lora.dropout=0.5", "lora.shared_dropout=true"])
    autocast = make_autocast("fp32", torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, 200, (n,), generator=gen).tolist() for n in (30, 17, 25, 9)]
    labels = torch.tensor([0, 1, 2, 1])
    targets = (labels, torch.softmax(torch.randn(4, 3, generator=gen), -1)) if soft else labels
    loss_fn = (lambda logits, t: distill_loss(logits, t, weight=0.5, temperature=2.0)) if soft else None
    step = [(*collate(rows, 0, torch.device("cpu")), targets)]
    passes = [resized(step[0], n, 0) for n in (48, 16)]

    def first_step(with_passes: bool):
        torch.manual_seed(0)
        model = build_fast(cfg)
        model.train()
        params = trainable_parameters(model)
        before = [p.detach().clone() for p in params]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        torch.manual_seed(1)
        if with_passes:
            state = torch.get_rng_state()
            compile_passes(model, passes, params, autocast, torch.device("cpu"), loss_fn)
            assert torch.equal(torch.get_rng_state(), state)
            assert all(p.grad is None for p in params)
            assert all(torch.equal(p, b) for p, b in zip(params, before))
        loss, _ = train_step(model, step, optimizer, None, params, autocast, 1.0, loss_fn=loss_fn)
        return loss, [p.detach().clone() for p in params]

    plain_loss, plain = first_step(False)
    loss, after = first_step(True)
    assert torch.equal(loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(after, plain))
    # the passes did draw random numbers: without fork_rng the state would have moved
    model = build_fast(cfg)
    model.train()
    state = torch.get_rng_state()
    model(input_ids=passes[0][0], attention_mask=passes[0][1])
    assert not torch.equal(torch.get_rng_state(), state)


def _ddp_rank(rank: int, port: int, out: str) -> None:
    """One rank of a two-process gloo group: the first DDP step of a tiny fast-path model on this rank's own rows,
    without and then with the passes before it (under ``no_sync``, as a fold with several ranks runs them)."""
    import os

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = load_config(CONFIGS / "smoke.yaml", ["lora.dropout=0.5", "lora.shared_dropout=true"])
        autocast = make_autocast("fp32", torch.device("cpu"))
        gen = torch.Generator().manual_seed(10 + rank)  # each rank its own rows
        rows = [torch.randint(4, 200, (n,), generator=gen).tolist() for n in (30, 17)]
        step = [(*collate(rows, 0, torch.device("cpu")), torch.tensor([0, 2]))]
        passes = [resized(step[0], n, 0) for n in (48, 16)]  # the same lengths on both ranks, as the fold's union
        result = {}
        for with_passes in (False, True):
            torch.manual_seed(0)
            model = build_fast(cfg)
            model.train()
            ddp = DistributedDataParallel(model, find_unused_parameters=False)
            reduced = []  # gradient buckets DDP all-reduced, counted by a communication hook (DDP's public API)

            def counting(state, bucket, reduced=reduced):
                reduced.append(bucket.index())
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, counting)
            params = trainable_parameters(model)
            optimizer = torch.optim.AdamW(params, lr=1e-2)
            torch.manual_seed(1 + rank)
            if with_passes:
                compile_passes(ddp, passes, params, autocast, torch.device("cpu"), ddp=True)
                result["reduced_by_passes"] = len(reduced)
            train_step(ddp, step, optimizer, None, params, autocast, 1.0, ddp=True)
            result[with_passes] = [p.detach().clone() for p in params]
            result[f"reduced_{with_passes}"] = len(reduced)
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_with_several_ranks_the_passes_run_without_all_reduce_and_the_step_is_unchanged(tmp_path):
    """DDP: the passes run under ``no_sync`` (no gradient all-reduce, the same number of forward passes on every
    rank), and the first synchronised step after them gives every rank the same weights, those of the step without
    the passes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for r in ranks:
        assert r["reduced_by_passes"] == 0 and r["reduced_True"] == r["reduced_False"] > 0
        assert all(torch.equal(a, b) for a, b in zip(r[True], r[False]))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0][True], ranks[1][True]))  # the step all-reduced
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0][True], build_initial()))


def build_initial():
    torch.manual_seed(0)
    model = build_fast(load_config(CONFIGS / "smoke.yaml", ["lora.dropout=0.5", "lora.shared_dropout=true"]))
    return [p.detach().clone() for p in trainable_parameters(model)]
