"""model.pooled_last_layer against the plain top layer on the tiny nf4 Gemma-2 with LoRA on q/k/v (fp32, CPU): the
same logits, loss and LoRA gradients, eager and compiled, and the pooled layer really computing B rows."""

import pytest
import torch

from tests.conftest import CONFIGS
from tests.trainer_core.fastpath.fast_model import build_fast
from trainer_core.config import ConfigError, load_config, validate
from trainer_core.data.batching import collate
from trainer_core.fastpath import dequant_cache
from trainer_core.fastpath.last_layer import PooledLastLayer, pool_last_layer
from trainer_core.model.build import decoder_layers
from trainer_core.model.precision import DTYPES, make_autocast

LENGTHS = (40, 64, 17, 33, 9)  # right-padded to 64; the smoke model's sliding window is 32


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows of different lengths plus one left-padded row (pooled at the last position)."""
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(4, 260, (n,), generator=gen).tolist() for n in LENGTHS]
    input_ids, mask = collate(ids, 0, torch.device("cpu"))
    input_ids[-1], mask[-1] = input_ids[-1].roll(64 - LENGTHS[-1]), mask[-1].roll(64 - LENGTHS[-1])
    return input_ids, mask, torch.tensor([0, 1, 2, 1, 0])


def run(pooled: bool, layers: int = 4, compile: str = "off", checkpointing: str = "off", dropout: float = 0.0,
        cache: bool = False, precision: str = "fp32", attn: str = "eager"):
    """(logits, loss, LoRA/head gradients by name, the model) of one batch; ``layers``=3 puts a sliding-window layer
    on top, 4 a global one. LoRA on q/k/v of layers >= 2. Also serves tests/trainer_core/fastpath/test_attention.py."""
    cfg = load_config(CONFIGS / "smoke.yaml", [f"lora.dropout={dropout}", f"model.compile={compile}",
                                               f"model.pooled_last_layer={str(pooled).lower()}",
                                               f"model.attn_implementation={attn}"])
    validate(cfg)
    cfg.model.random_config["num_hidden_layers"] = layers
    torch.manual_seed(0)
    model = build_fast(cfg, precision=precision, checkpointing=checkpointing)
    if cache:
        cached, total, _ = dequant_cache.cache_dequantized_weights(model, float("inf"), DTYPES[precision])
        assert cached == total == layers
    with torch.no_grad():  # LoRA B starts at zero; give it (and the norms) values so every tensor matters
        for n, p in model.named_parameters():
            if "lora_B" in n or "norm" in n:
                p.normal_(0, 0.1)
    input_ids, mask, labels = batch()
    model.train()
    with make_autocast(precision, torch.device("cpu"))():
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), loss.item(), grads, model


def assert_same(a, b, grad_tol: tuple[float, float] = (1e-5, 1e-7)) -> None:
    """Logits to 1e-5 (absolute and relative), loss to a relative 1e-6, every gradient to ``grad_tol`` (relative,
    absolute). Measured: logits within 6e-8 eager (2e-7 compiled), gradients within 7e-7 of their largest entry
    eager (1.4e-6 compiled)."""
    (l_a, loss_a, g_a, _), (l_b, loss_b, g_b, _) = a, b
    torch.testing.assert_close(l_a, l_b, rtol=1e-5, atol=1e-5)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert g_a.keys() == g_b.keys() and sum("lora_A" in k for k in g_a) >= 3  # q/k/v of the top layer at least
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_b[k], rtol=grad_tol[0], atol=grad_tol[1])


@pytest.mark.parametrize("layers", [3, 4], ids=["sliding-top", "global-top"])
@pytest.mark.parametrize("checkpointing", ["off", "on", "reentrant"])
def test_pooled_top_layer_gives_the_plain_numbers(layers, checkpointing):
    assert_same(run(True, layers, checkpointing=checkpointing), run(False, layers, checkpointing=checkpointing))


def test_pooled_top_layer_computes_one_query_row_per_sequence():
    """The top layer's q_proj sees B rows (not B x T), its k_proj all B x T; the layer below is untouched; the layer
    stays in its place with its parameter names (checkpoints load either way)."""
    _, _, grads, model = run(True)
    layers = decoder_layers(model)
    assert len(layers) == 4 and isinstance(layers[3], PooledLastLayer) and not isinstance(layers[2], PooledLastLayer)
    assert "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight" in grads
    seen = {}
    for name in ("q_proj", "k_proj"):
        for i in (2, 3):
            module = getattr(layers[i].self_attn, name)
            module.register_forward_hook(lambda m, args, out, key=(i, name): seen.__setitem__(key, args[0].shape))
    input_ids, mask, _ = batch()
    model(input_ids=input_ids, attention_mask=mask)
    assert seen == {(3, "q_proj"): (5, 64), (3, "k_proj"): (5, 64, 64), (2, "q_proj"): (5, 64, 64),
                    (2, "k_proj"): (5, 64, 64)}
    assert pool_last_layer(model) is None  # already pooled
    # models built in one process share the pooled class (torch.compile guards on module types)
    assert type(decoder_layers(run(True)[3])[3]) is type(layers[3])


def test_pooled_top_layer_with_the_dequantized_weight_cache():
    """trainer_core.fastpath.dequant_cache swaps the pooled layer's nf4 linears too (it walks the same module), and the
    numbers stay the plain ones."""
    pooled = run(True, cache=True)
    assert isinstance(decoder_layers(pooled[3])[3].mlp.down_proj, dequant_cache.DequantizedLinear)
    assert_same(pooled, run(False, cache=True))


def test_pooled_top_layer_under_bf16_autocast():
    """The GPU's bf16 autocast with the dequantized cache (the fast config's path): the same dtypes flow through, so
    the plain numbers to bf16 rounding (logits 1e-2, loss relative 1e-2)."""
    (l_p, loss_p, _, _), (l_0, loss_0, _, _) = (run(p, cache=True, precision="bf16") for p in (True, False))
    torch.testing.assert_close(l_p, l_0, rtol=1e-2, atol=1e-2)
    assert loss_p == pytest.approx(loss_0, rel=1e-2)


@pytest.mark.slow  # torch.compile on the CPU
def test_compiled_pooled_top_layer_gives_the_plain_numbers():
    """model.compile=on compiles the pooled computation: the eager plain numbers; a batch of the same shape pooled at
    other positions (a tensor argument, not a module attribute) needs no new graph."""
    pooled = run(True, compile="on")
    model = pooled[3]
    top = decoder_layers(model)[3]
    assert top.pooled_fn is not PooledLastLayer.pooled_fn  # the compiled one
    assert_same(pooled, run(False), grad_tol=(1e-4, 1e-6))  # fused kernels reorder sums (as test_fast_path)
    calls = []
    compiled = top.pooled_fn
    top.pooled_fn = lambda *args: calls.append(args[2].tolist()) or compiled(*args)
    input_ids, mask, _ = batch()
    input_ids[:4, 50:], mask[:4, 50:] = 0, 0  # rows 0 and 1 now end earlier
    with torch._dynamo.config.patch(error_on_recompile=True):
        model(input_ids=input_ids, attention_mask=mask).logits.sum().backward()
    assert calls == [[39, 49, 16, 32, 63]]  # the last non-pad token of each row


def test_train_mode_with_lora_dropout_runs():
    """LoRA dropout 0.05 (the pooled q_proj draws other random numbers than the plain one, so only a smoke test):
    finite loss near the plain model's, a finite, non-zero gradient on every LoRA tensor."""
    _, loss, grads, _ = run(True, dropout=0.05)
    _, loss_plain, _, _ = run(False, dropout=0.05)
    assert loss == pytest.approx(loss_plain, rel=0.1)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_config_refuses_what_it_cannot_serve():
    cfg = load_config(CONFIGS / "demo_cpu.yaml", ["model.pooled_last_layer=true"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert ("model.pooled_last_layer=true computes the top layer only at the last non-pad token, the one the joint "
            "head reads, from eager attention's mask on a Gemma-2: it needs model.head=joint (got pairwise), "
            "model.attn_implementation eager or block_causal (got None)") in str(e.value)
    cfg = load_config(CONFIGS / "smoke.yaml", ["model.pooled_last_layer=true", "model.random_config.model_type=llama"])
    with pytest.raises(ConfigError, match="a Gemma-2 \\(got random_config.model_type=llama\\)"):
        validate(cfg)
    validate(load_config(CONFIGS / "gemma2_9b_fast.yaml"))


def test_other_models_are_refused_when_built():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="Gemma-2 sequence classifiers only, not LlamaForSequenceClassification"):
        pool_last_layer(model)
