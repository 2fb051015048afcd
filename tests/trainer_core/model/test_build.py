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
