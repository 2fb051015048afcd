"""Model building: the random-weights cache (``model.init=random``) must not change what is built."""

import torch

from tests.conftest import CONFIGS
from trainer_core.config import load_config
from trainer_core.model.build import build_model


def test_cold_and_warm_random_weights_cache_build_the_same_model(tmp_path, monkeypatch):
    """The first build on a machine saves the random base weights under TRAINER_CORE_CACHE, later builds load them.
    Both must give the same model, LoRA adapters included (they are drawn from the global RNG after the base), and
    leave the global RNG in the same state: saving the cache may not move it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRAINER_CORE_CACHE", str(cache))
    cfg = load_config(CONFIGS / "smoke.yaml")

    def build() -> tuple[dict, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.lora, pad_token_id=0, precision="fp32", device=torch.device("cpu"),
                            seed=cfg.train.seed)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, torch.get_rng_state()

    cold, rng_after_cold = build()
    assert any(p.name == "config.json" for p in cache.rglob("*")), "the first build did not fill the cache"
    warm, rng_after_warm = build()
    assert torch.equal(rng_after_cold, rng_after_warm)
    assert cold.keys() == warm.keys() and any("lora_A" in k for k in cold)
    for k in cold:
        assert torch.equal(cold[k], warm[k]), k


def _build_as_rank(rank: int, init_file: str, cache: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["TRAINER_CORE_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = load_config(CONFIGS / "smoke.yaml")
        if rank == 1:  # rank 1 fills the cold cache; rank 0 loads what it wrote
            build_model(cfg.model, cfg.lora, pad_token_id=0, precision="fp32", device=torch.device("cpu"))
        dist.barrier()
        if rank == 0:
            build_model(cfg.model, cfg.lora, pad_token_id=0, precision="fp32", device=torch.device("cpu"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_cache_built_by_rank_one_of_a_ddp_group_loads_on_every_rank(tmp_path):
    """CI once failed a two-worker fold on a cold machine: rank 1 took the cache lock first, and transformers'
    save_pretrained writes config.json on rank 0 only, leaving a folder no rank could load."""
    import torch.multiprocessing as mp

    cache = tmp_path / "cache"
    mp.start_processes(_build_as_rank, args=(str(tmp_path / "init"), str(cache)), nprocs=2, start_method="spawn")
    assert len(list(cache.glob("*/config.json"))) == 1


def test_an_int8_model_logs_bitsandbytes_cast_line_once_however_many_matmuls(caplog):
    """bitsandbytes' int8 matmul logs its cast line at every call (fp32 inputs here): one line for the whole of a fold's
    training and prediction, not one a matmul (84 lines for three steps of this tiny model; millions for a 9B fold)."""
    import logging

    cfg = load_config(CONFIGS / "smoke.yaml", ["model.quantization=int8"])
    model = build_model(cfg.model, cfg.lora, pad_token_id=0, precision="fp32", device=torch.device("cpu"))
    ids = torch.randint(4, 200, (2, 16))
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        for _ in range(3):
            model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    cast = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert len(cast) == 1, [r.getMessage() for r in cast]
