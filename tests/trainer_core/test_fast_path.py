"""The fast path's numerics against the plain (seed) path on the tiny Gemma-2: same weights, same batch."""


import pytest
import torch

from tests.conftest import CONFIGS
from trainer_core.batching import collate
from trainer_core.config import load_config
from trainer_core.modeling import build_model, trainable_parameters
from trainer_core.step import make_autocast


def grads_and_loss(checkpointing: str, precision: str = "fp32", compile: str = "off"):
    cfg = load_config(CONFIGS / "smoke.yaml", ["lora.dropout=0.0", f"model.compile={compile}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.lora, pad_token_id=0, precision=precision, device=torch.device("cpu"),
                        checkpointing=checkpointing)
    with torch.no_grad():  # LoRA B starts at zero; give it values so LoRA A gets gradients too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(4, 260, (n,), generator=gen).tolist() for n in (40, 64, 17, 33)]
    input_ids, mask = collate(ids, 0, torch.device("cpu"))
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    with make_autocast(precision, torch.device("cpu"))():
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return logits.detach(), loss.item(), {n: p.grad.clone() for n, p in zip(names, trainable_parameters(model))}


def test_no_backward_through_frozen_layers_changes_nothing():
    """Ours (non-reentrant recomputation or none, no input grads) vs the seed's reentrant recomputation with input
    grads: identical loss and identical gradients on every trained tensor (fp32, tolerance 1e-5)."""
    l_seed, loss_seed, g_seed = grads_and_loss("reentrant")
    for mode in ("off", "on"):
        l_ours, loss_ours, g_ours = grads_and_loss(mode)
        assert loss_ours == pytest.approx(loss_seed, rel=1e-6)
        torch.testing.assert_close(l_ours, l_seed, rtol=1e-5, atol=1e-5)
        assert g_ours.keys() == g_seed.keys() and any("lora_A" in k for k in g_ours)
        for k in g_seed:
            torch.testing.assert_close(g_ours[k], g_seed[k], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_stays_close_to_fp32():
    """bf16 compute (the GPU default) against fp32: logits within 0.05 absolute (bf16 keeps ~3 significant digits
    through 4 layers; these logits are ~0.3), loss within 2%."""
    l32, loss32, _ = grads_and_loss("off", "fp32")
    l16, loss16, _ = grads_and_loss("off", "bf16")
    assert (l16 - l32).abs().max() <= 0.05
    assert loss16 == pytest.approx(loss32, rel=0.02)


def test_compiled_layers_match_eager():
    """model.compile=on (torch.compile of each decoder layer, nf4 + LoRA, as the fast GPU config runs) against eager:
    the same logits, loss and gradients in fp32 (fused kernels reorder float sums: tolerance 1e-5 / 1e-4)."""
    l_eager, loss_eager, g_eager = grads_and_loss("off")
    l_comp, loss_comp, g_comp = grads_and_loss("off", compile="on")
    assert loss_comp == pytest.approx(loss_eager, rel=1e-5)
    torch.testing.assert_close(l_comp, l_eager, rtol=1e-5, atol=1e-5)
    assert g_comp.keys() == g_eager.keys()
    for k in g_eager:
        torch.testing.assert_close(g_comp[k], g_eager[k], rtol=1e-4, atol=1e-6)
