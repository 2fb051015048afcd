"""lora.shared_dropout on the tiny nf4 Gemma-2 with LoRA on q/k/v (CPU, fp32): each module's mask has the configured
rate and scales what it keeps as nn.Dropout does, the three masks of one attention are independent, a recomputed layer
draws the same masks, evaluation is untouched, and the compiled layer has no graph break."""

import pytest
import torch

from tests.conftest import CONFIGS
from tests.trainer_core.fastpath.fast_model import build_fast
from tests.trainer_core.fastpath.test_last_layer import batch
from trainer_core.config import load_config, validate
from trainer_core.fastpath.lora_dropout import FIELD_BITS, SharedDropout, share_dropout_draws
from trainer_core.model.precision import make_autocast


def build(shared: bool, dropout: float = 0.3, checkpointing: str = "off", compile: str = "off", pooled: bool = False,
          *extra: str):
    overrides = [f"lora.dropout={dropout}", f"lora.shared_dropout={str(shared).lower()}", f"model.compile={compile}",
                 f"model.pooled_last_layer={str(pooled).lower()}", *extra]
    cfg = load_config(CONFIGS / "smoke.yaml", overrides)
    validate(cfg)
    torch.manual_seed(0)
    model = build_fast(cfg, checkpointing=checkpointing)
    with torch.no_grad():  # LoRA B starts at zero: give it values so the adapters (and their dropout) matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def step(model, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, LoRA gradients) of one training forward and backward pass."""
    input_ids, mask, labels = batch()
    model.train()
    torch.manual_seed(seed)
    with make_autocast("fp32", torch.device("cpu"))():
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def dropouts(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith("lora_dropout.default")}


def test_sibling_masks_are_independent_at_the_configured_rate():
    model = build(True, pooled=True)
    modules = dropouts(model)
    assert len(modules) == 6  # q/k/v of layers 2 and 3
    shared = {n: m for n, m in modules.items() if isinstance(m, SharedDropout)}
    assert len(shared) == 6 and {m.slot for m in shared.values()} == {0, 1, 2}
    seen = {}

    def capture(name):
        def hook(module, args, output):
            seen[name] = (args[0].detach(), output.detach())
        return hook

    for n, m in shared.items():
        m.register_forward_hook(capture(n))
    step(model)
    scale = 1 / (1 - round(0.3 * 2**FIELD_BITS) / 2**FIELD_BITS)
    masks = {}
    for name, (x, y) in seen.items():
        kept = y != 0
        torch.testing.assert_close(y[kept], x[kept] * scale)  # inverted dropout, as nn.Dropout scales
        tol = 5 * (0.21 / kept.numel()) ** 0.5  # five standard deviations (the pooled q_proj sees 5 rows only)
        assert kept.float().mean().item() == pytest.approx(0.7, abs=tol), name
        masks[name] = kept.flatten().float()
    layer2 = [m for n, m in masks.items() if ".layers.2." in n]
    assert len(layer2) == 3
    for i in range(3):  # independent: both kept in ~0.49 of the elements (identical masks would give 0.7)
        for j in range(i + 1, 3):
            assert (layer2[i] * layer2[j]).mean().item() == pytest.approx(0.49, abs=0.02)
    # the pooled top layer calls k_proj and v_proj itself (no draw from its attention): plain dropout, same rate
    top_k = next(m for n, m in masks.items() if ".layers.3." in n and "k_proj" in n)
    assert top_k.numel() > 10_000 and top_k.mean().item() == pytest.approx(0.7, abs=0.02)


def test_recomputed_layers_draw_the_same_masks():
    """Non-reentrant recomputation re-runs each layer in the backward pass: the same draw, so the same gradients as
    without recomputation (a new draw there would make them differ)."""
    logits_a, grads_a = step(build(True, checkpointing="off"))
    logits_b, grads_b = step(build(True, checkpointing="on"))
    torch.testing.assert_close(logits_a, logits_b)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-5, atol=1e-7)


def test_other_draws_than_plain_dropout_and_the_same_model_in_evaluation():
    plain, shared = build(False), build(True)
    _, grads_plain = step(plain)
    _, grads_shared = step(shared)
    assert any(not torch.allclose(grads_plain[k], grads_shared[k]) for k in grads_plain)  # other masks
    input_ids, mask, _ = batch()
    plain.eval()
    shared.eval()
    with torch.no_grad():
        torch.testing.assert_close(shared(input_ids=input_ids, attention_mask=mask).logits,
                                   plain(input_ids=input_ids, attention_mask=mask).logits)


def test_nothing_to_share_without_dropout_or_siblings():
    assert share_dropout_draws(build(False, dropout=0.0))[0] == 0  # peft's Identity: nothing drawn
    assert share_dropout_draws(build(False))[0] == 2  # the attentions of layers 2 and 3
    targets = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj]"
    every = build(False, 0.3, "off", "off", False, targets)
    assert share_dropout_draws(every)[0] == 4  # and their MLPs (gate/up); o_proj reads another input: its own dropout
    kinds = {n.split(".")[-3]: type(m).__name__ for n, m in dropouts(every).items()}
    assert kinds == {"q_proj": "SharedDropout", "k_proj": "SharedDropout", "v_proj": "SharedDropout",
                     "o_proj": "Dropout", "gate_proj": "SharedDropout", "up_proj": "SharedDropout"}
    with pytest.raises(ValueError, match="0 < lora.dropout < 1"):
        SharedDropout(1.0, 0, None)


@pytest.mark.slow  # torch.compile on the CPU
def test_compiled_layers_have_no_graph_break():
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = build(True, compile="on")
    logits, grads = step(model)
    assert torch.isfinite(logits).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


@pytest.mark.slow  # torch.compile (dynamo tracing) on the CPU
def test_a_compiled_attention_draws_once():
    """What torch.compile traces for a trained layer: one randint for its three LoRA dropouts, no other random op (a
    fallback to plain dropout would trace three)."""
    from trainer_core.model.build import decoder_layers

    graphs = []

    def capture(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return gm.forward

    torch._dynamo.reset()
    model = build(True)
    for layer in decoder_layers(model):
        layer.compile(backend=capture)
    step(model)
    assert len(graphs) == 3  # frozen layers (one graph), the two trained ones (sliding and global attention)
    for graph, trained in zip(graphs, (False, True, True)):
        assert sum("randint" in t for t in graph) == trained
        assert sum("rand" in t or "bernoulli" in t for t in graph) == trained
        assert sum("dropout" in t for t in graph) == 1  # the attention weights' own (p = 0), in every layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_masks_on_cuda_have_the_rate_and_are_independent():
    """The GPU path: torch.compile's kernel for the draw (a 64-bit Philox integer per element) and the three fields."""
    from trainer_core.fastpath.lora_dropout import Draw

    draw = Draw()
    modules = [SharedDropout(0.05, slot, draw) for slot in range(3)]

    def masks(x):
        draw.bits = torch.randint(0, 1 << (3 * FIELD_BITS + 2), x.shape, device=x.device, dtype=torch.int64)
        out = [m(x) != 0 for m in modules]
        draw.bits = None
        return out

    x = torch.ones(4, 1024, 3584, device="cuda")
    kept = torch.compile(masks)(x)
    rates = [k.float().mean().item() for k in kept]
    assert rates == pytest.approx([0.95] * 3, abs=5e-4)
    for i in range(3):
        for j in range(i + 1, 3):
            assert (kept[i] & kept[j]).float().mean().item() == pytest.approx(0.95 ** 2, abs=5e-4)
    assert draw.bits is None
