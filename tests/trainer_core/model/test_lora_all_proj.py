"""configs/gemma2_9b_all_proj.yaml: LoRA on all seven projections of Gemma-2, checked on the tiny smoke architecture."""

import torch

from tests.conftest import CONFIGS
from trainer_core.config import load_config, validate
from trainer_core.data.tokenization import build_tokenizer
from trainer_core.model.build import build_model

SEVEN = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_all_proj_config_is_the_seed_recipe_with_seven_targets():
    seed, all_proj = load_config(CONFIGS / "gemma2_9b_qlora.yaml"), load_config(CONFIGS / "gemma2_9b_all_proj.yaml")
    validate(all_proj)
    assert set(all_proj.lora.target_modules) == SEVEN
    seed_d, all_d = seed.to_dict(), all_proj.to_dict()
    for d in (seed_d, all_d):
        d.pop("experiment")
        d["lora"].pop("target_modules")
    assert seed_d == all_d  # nothing else differs from the seed recipe


def test_seven_targets_put_adapters_on_every_projection_of_the_adapted_layers():
    all_proj = load_config(CONFIGS / "gemma2_9b_all_proj.yaml")
    cfg = load_config(CONFIGS / "smoke.yaml", {"lora.target_modules": all_proj.lora.target_modules})
    validate(cfg)
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, cfg.lora, pad_token_id=tok.pad_token_id, precision="fp32",
                        device=torch.device("cpu"))
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert {name.split(".")[-1] for name in adapted} == SEVEN
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in adapted}
    assert layers == set(range(cfg.lora.freeze_layers, 4))  # smoke: 4 layers, the lower freeze_layers stay plain
    assert len(adapted) == 7 * len(layers)
