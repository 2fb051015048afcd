"""The fast path's numerics against the plain (seed) path on the tiny Gemma-2: same weights, same batch."""


import pytest
import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V

from tests.conftest import CONFIGS
from tests.trainer_core.fastpath.fast_model import build_fast
from trainer_core import fastpath
from trainer_core.config import load_config
from trainer_core.data.batching import collate
from trainer_core.fastpath import dequant_cache
from trainer_core.fastpath.compile import keep_nf4_layout_on_cpu
from trainer_core.fastpath.persistent_reduction import PersistentRows
from trainer_core.model import build as model_build
from trainer_core.model.build import build_model, trainable_parameters
from trainer_core.model.precision import DTYPES, make_autocast


def grads_and_loss(checkpointing: str, precision: str = "fp32", compile: str = "off", cache: bool = False,
                   prepare=None):
    """(logits, loss, gradients by trainable parameter name) of one batch on the tiny Gemma-2; ``prepare(model)``
    runs on the built model first."""
    cfg = load_config(CONFIGS / "smoke.yaml", ["lora.dropout=0.0", f"model.compile={compile}"])
    torch.manual_seed(0)
    model = build_fast(cfg, precision=precision, checkpointing=checkpointing)
    if prepare is not None:
        prepare(model)
    if cache:
        cached, total, _ = dequant_cache.cache_dequantized_weights(model, float("inf"), DTYPES[precision])
        assert cached == total == 4
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


@pytest.mark.slow  # torch.compile on the CPU: minutes on 2 cores
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


def test_compile_options_reach_every_compiled_layer(monkeypatch):
    """model.compile_options go to torch.compile of each decoder layer as dotted names; without them, no options.
    model.persistent_reduction_max: inductor's heuristics replaced in this thread, the limit in every layer's options
    (inductor's cache key)."""
    calls = []
    real = torch.compile

    def recording(target, *args, **kwargs):
        if type(getattr(target, "__self__", None)).__name__.endswith("DecoderLayer"):  # not the library's own compiles
            calls.append(kwargs.get("options"))
        return real(target, *args, **kwargs)
    monkeypatch.setattr(torch, "compile", recording)
    for options, expected in (({"triton": {"cudagraphs": False}}, {"triton.cudagraphs": False}), ({}, None)):
        calls.clear()
        cfg = load_config(CONFIGS / "smoke.yaml", {"model.compile": "on", "model.compile_options": options})
        build_fast(cfg)
        assert calls == [expected] * cfg.model.random_config["num_hidden_layers"]
    calls.clear()
    cfg = load_config(CONFIGS / "smoke.yaml", {"model.compile": "on", "model.persistent_reduction_max": 1024})
    try:
        build_fast(cfg)
        assert isinstance(V.choices, PersistentRows) and V.choices.limit == 1024  # this thread compiles the forward
    finally:
        V.set_choices_handler(InductorChoices())
    assert [{k: v.uuid() for k, v in c.items()} for c in calls] == [
        {"post_grad_custom_post_pass": "trainer_core.fastpath.persistent_reduction:1024"}] * cfg.model.random_config[
            "num_hidden_layers"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dequantized_weight_cache_matches_nf4(precision):
    """model.dequant_cache: frozen nf4 layers replaced by their dequantized weights give the nf4 path's logits, loss
    and gradients (fp32: to 1e-5; bf16 autocast: the same bf16 matmul inputs, so to bf16 rounding of the sums)."""
    l_nf4, loss_nf4, g_nf4 = grads_and_loss("off", precision)
    l_c, loss_c, g_c = grads_and_loss("off", precision, cache=True)
    tol = {"fp32": (1e-5, 1e-6), "bf16": (1e-2, 1e-3)}[precision]
    assert loss_c == pytest.approx(loss_nf4, rel=tol[0])
    torch.testing.assert_close(l_c, l_nf4, rtol=tol[0], atol=tol[0])
    assert g_c.keys() == g_nf4.keys()
    for k in g_nf4:
        torch.testing.assert_close(g_c[k], g_nf4[k], rtol=tol[0] * 10, atol=tol[1])


def test_dequant_cache_respects_its_byte_budget():
    """auto: only as many whole decoder layers as fit in the room left, top layers (the adapted ones) first."""
    cfg = load_config(CONFIGS / "smoke.yaml")
    model = build_model(cfg.model, cfg.lora, pad_token_id=0, precision="fp32", device=torch.device("cpu"))
    layer_bytes = 4 * (64 * 16 * 4 + 2 * 64 * 16 * 2 + 16 * 4 * 64 + 3 * 64 * 128)  # q, k+v, o, gate/up/down; fp32
    cached, total, gib = dequant_cache.cache_dequantized_weights(model, 2.5 * layer_bytes, torch.float32)
    assert (cached, total) == (2, 4) and gib * 2**30 == 2 * layer_bytes
    layers = model.get_base_model().model.layers
    assert isinstance(layers[3].mlp.down_proj, dequant_cache.DequantizedLinear)
    assert not isinstance(layers[1].mlp.down_proj, dequant_cache.DequantizedLinear)


def test_prediction_cache_leaves_room_for_the_inference_batch(monkeypatch):
    """A model that predicts: auto caches what fits in the free memory less the inference activations of the batch
    (rows x tokens, twice for the pairwise head's two sequences); on caches everything, off nothing."""
    from trainer_core.model.memory import SAFETY, inference_bytes_per_token

    cfg = load_config(CONFIGS / "smoke.yaml")
    layer_bytes = 4 * (64 * 16 * 4 + 2 * 64 * 16 * 2 + 16 * 4 * 64 + 3 * 64 * 128)  # as above: one layer, fp32
    cpu = torch.device("cpu")
    for rows, seqs, cached in ((8, 1, 2), (8, 2, 0), (4, 2, 2)):
        model = build_model(cfg.model, cfg.lora, pad_token_id=0, precision="fp32", device=cpu)
        free = inference_bytes_per_token(model.config, 64) * 64 * 8 * SAFETY + 2.5 * layer_bytes  # 8 rows of 64
        monkeypatch.setattr(dequant_cache, "free_device_bytes", lambda device, budget, free=free: free)
        note = dequant_cache.cache_for_prediction(model, "auto", torch.float32, cpu, seq_len=64, rows=rows,
                                                  budget_gib=None, seqs_per_row=seqs)
        assert note == (f"dequantized weights cached: {cached}/4 layers "
                        f"({cached * layer_bytes / 2**30:.1f} GiB)"), (rows, seqs, note)
    model = build_model(cfg.model, cfg.lora, pad_token_id=0, precision="fp32", device=cpu)
    assert dequant_cache.cache_for_prediction(model, "off", torch.float32, cpu, seq_len=64, rows=8,
                                              budget_gib=None) == ""
    assert dequant_cache.cache_for_prediction(model, "on", torch.float32, cpu, seq_len=64, rows=8,
                                              budget_gib=None).startswith("dequantized weights cached: 4/4")


def test_embedding_table_kept_in_load_dtype_gives_the_same_logits(monkeypatch):
    """peft upcasts the embedding table to fp32; keeping it in bf16 (its load dtype) with fp32 rows out gives the
    fp32 table's logits exactly (bf16 compute, same weights)."""
    cfg = load_config(CONFIGS / "smoke.yaml")
    model = build_model(cfg.model, cfg.lora, pad_token_id=0, precision="bf16", device=torch.device("cpu"))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    l_kept, loss_kept, _ = grads_and_loss("off", "bf16")
    monkeypatch.setattr(model_build, "keep_embedding_dtype", lambda model, dtype: False)
    l_fp32, loss_fp32, _ = grads_and_loss("off", "bf16")
    assert loss_kept == loss_fp32
    torch.testing.assert_close(l_kept, l_fp32, rtol=0, atol=0)


def test_a_short_batch_filled_with_ignored_rows_gives_the_same_loss_and_gradients():
    """Compiled folds fill the epoch's last, short micro-batch up to the batch size with a repeated row whose label
    is ignored: the loss and every gradient equal those of the short batch alone (fp32, tolerance 1e-5)."""
    import numpy as np

    from trainer_core.fold.data import fill_batch
    from trainer_core.fold.step import train_step

    cfg = load_config(CONFIGS / "smoke.yaml", ["lora.dropout=0.0", "model.gradient_checkpointing=off"])
    gen = torch.Generator().manual_seed(2)
    ids = [torch.randint(4, 260, (n,), generator=gen).tolist() for n in (40, 64, 17)]
    labels = torch.tensor([0, 2, 1])
    results = []
    for size in (3, 4):
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.lora, pad_token_id=0, precision="fp32", device=torch.device("cpu"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        model.train()
        idx, lab = fill_batch(np.arange(3), labels, size)
        assert len(idx) == size and (lab[3:] == -100).all()
        input_ids, mask = collate([ids[i] for i in idx], 0, torch.device("cpu"))
        params = trainable_parameters(model)
        opt = torch.optim.SGD(params, lr=0.0)  # the step leaves the weights; only loss and gradients are compared
        grads = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.register_hook(lambda g, n=n, out=grads: out.__setitem__(n, g.clone()))
        loss, _ = train_step(model, [(input_ids, mask, lab)], opt, None, params, make_autocast("fp32", torch.device(
            "cpu")), None)
        results.append((float(loss), grads))
    (loss3, g3), (loss4, g4) = results
    assert loss4 == pytest.approx(loss3, rel=1e-6)
    assert g3.keys() == g4.keys() and len(g3) > 0
    for k in g3:
        torch.testing.assert_close(g4[k], g3[k], rtol=1e-5, atol=1e-7)


def test_partial_recomputation_changes_no_gradient():
    """Recomputing only some trained layers (a card that almost fits) gives the gradients of no recomputation."""
    from trainer_core.fastpath.recompute import enable_checkpointing
    from trainer_core.model.build import decoder_layers

    def recompute_layer_2(model):
        enable_checkpointing(model, only=range(2, 3))
        assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [False, False, True, False]

    _, loss_off, g_off = grads_and_loss("off")
    _, loss_part, g_part = grads_and_loss("off", prepare=recompute_layer_2)
    assert loss_part == pytest.approx(loss_off, rel=1e-6)
    assert g_part.keys() == g_off.keys()
    for n in g_off:
        torch.testing.assert_close(g_part[n], g_off[n], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_nf4_layers_predict_on_the_cpu():
    """Held-out rows through compiled nf4 layers on the CPU (eval mode, no grad, inductor) give the eager layers'
    numbers. On a CPU with AVX512-BF16, bitsandbytes repacked the weights inside the traced forward and inductor's
    input check failed on the first held-out batch, after the whole fold had trained; repacking is now off for compiled
    layers on the CPU (trainer_core.fastpath.compile.keep_nf4_layout_on_cpu), and released with the fast path."""
    torch.compiler.reset()
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(4, 260, (n,), generator=gen).tolist() for n in (40, 64, 17, 33)]
    input_ids, mask = collate(ids, 0, torch.device("cpu"))
    logits, flags = {}, {}
    for setting in ("off", "on"):
        cfg = load_config(CONFIGS / "smoke.yaml", [f"model.compile={setting}", "model.gradient_checkpointing=off"])
        torch.manual_seed(0)
        model = build_fast(cfg)
        nf4 = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        assert nf4 and (setting == "off" or not any(m.support_avx512bf16_for_cpu for m in nf4))
        # eager: the same dequantizing path (bitsandbytes' packed CPU kernel computes other numbers, ~1e-3 apart)
        restore = keep_nf4_layout_on_cpu(model) if setting == "off" else (lambda: None)
        model.eval()
        with torch.no_grad():
            logits[setting] = model(input_ids=input_ids, attention_mask=mask).logits
        restore()
        fastpath.release(model)
        flags[setting] = [m.support_avx512bf16_for_cpu for m in nf4]
    torch.testing.assert_close(logits["on"], logits["off"], rtol=1e-4, atol=1e-5)
    assert flags["on"] == flags["off"]  # released: bitsandbytes' own choice again
