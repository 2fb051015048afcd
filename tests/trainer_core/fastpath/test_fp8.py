"""model.fp8_backward: the forward stays exact, the activation gradient through frozen cached layers is fp8 (emulated
on the CPU with the GPU path's rounding), close to bf16 but not equal to it."""

import pytest
import torch

from tests.conftest import CONFIGS
from trainer_core.config import ConfigError, load_config, validate
from trainer_core.fastpath import dequant_cache, fp8


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


def layer_and_grads(out_features=256, in_features=512, seed=0):
    """A bf16 frozen layer, an input that needs a gradient, and an upstream gradient whose channels span four decades
    (as gradients' do: a few large channels beside many small ones)."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5).to(torch.bfloat16)
    x = torch.randn(3, 10, in_features, generator=gen).to(torch.bfloat16).requires_grad_(True)
    grad_y = (torch.randn(3, 10, out_features, generator=gen) * torch.logspace(-3, 1, out_features)).to(torch.bfloat16)
    return dequant_cache.DequantizedLinear(w, None), x, grad_y


def forward_backward(layer, x, grad_y):
    y = layer(x)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    return y.detach(), grad_x


def test_forward_is_bit_identical_and_input_gradient_is_fp8_close():
    layer, x, grad_y = layer_and_grads()
    y_bf16, g_bf16 = forward_backward(layer, x, grad_y)
    assert layer.enable_fp8_backward() and layer.weight_fp8.dtype == torch.float8_e4m3fn
    assert not layer.fp8_scaled_mm  # CPU: the emulation
    y_fp8, g_fp8 = forward_backward(layer, x, grad_y)
    assert torch.equal(y_fp8, y_bf16)  # the forward is the plain bf16 F.linear
    ref = grad_y.float() @ layer.weight.float()  # exact grad_y @ W
    assert rel_err(g_bf16, ref) < 0.005  # bf16 output rounding only
    err = rel_err(g_fp8, ref)
    # measured 3.5% (e4m3: 3 mantissa bits, 2^-4 relative rounding per value on both operands); a wrong scale or
    # layout is off by orders of magnitude; and the fp8 path did run: 10x bf16's error
    assert 0.02 < err < 0.06, err
    assert g_fp8.dtype == torch.bfloat16 and g_fp8.shape == x.shape
    # the choice of e4m3 for grad_y (trainer_core/fastpath/fp8.py): e5m2 with the same row scales rounds coarser
    g_q, g_scale = fp8.quantize_rows(grad_y.reshape(-1, 256), torch.float8_e5m2, 57344.0)
    w_deq = (layer.weight_fp8.float() * layer.weight_fp8_scale.t()).t()
    assert rel_err((g_q.float() * g_scale) @ w_deq, ref.reshape(-1, 512)) > err


def test_quantization_is_row_scaled_and_zero_rows_stay_zero():
    t = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [1e-3, 3e-3, -2e-3, 0.0]])
    q, scale = fp8.quantize_rows(t, torch.float8_e4m3fn, fp8.E4M3_MAX)
    assert q.is_contiguous() and scale.shape == (3, 1)
    assert q.float().abs().amax(dim=1).tolist() == [448.0, 0.0, 448.0]  # each row's amax on the format's largest
    torch.testing.assert_close(q.float() * scale, t, rtol=2 ** -4, atol=0)
    w = torch.randn(32, 48).to(torch.bfloat16)
    w_q, w_scale = fp8.quantize_weight(w)
    assert w_q.shape == (48, 32) and w_scale.shape == (1, 48)  # W.T row-major = W column-major; a scale per column
    assert w_q.t().stride() == (1, 32)  # the column-major second operand _scaled_mm wants


def test_layers_that_do_not_fit_scaled_mm_keep_the_bf16_backward():
    layer, x, grad_y = layer_and_grads(out_features=40, in_features=512)  # 40: not a multiple of 16
    _, before = forward_backward(layer, x, grad_y)
    assert not layer.enable_fp8_backward() and layer.weight_fp8 is None
    _, after = forward_backward(layer, x, grad_y)
    assert torch.equal(before, after)


def tiny_model_grads(fp8_backward: bool, monkeypatch):
    """Trainable-parameter gradients of the tiny nf4 Gemma-2 (bf16, every layer cached), and how many times the fp8
    backward ran."""
    from tests.trainer_core.fastpath.test_fast_path import grads_and_loss

    calls = []
    real = fp8.grad_input
    monkeypatch.setattr(fp8, "grad_input", lambda *a: calls.append(1) or real(*a))

    def prepare(model):
        if fp8_backward:  # as fold.py calls it; smoke.yaml adapts layers 2 and 3 (lora.freeze_layers=2)
            note = dequant_cache.cache_for_training(model, "on", torch.bfloat16, torch.device("cpu"), freeze_layers=2,
                                                    seq_len=64, micro_batch=4, budget_gib=None, fp8_backward=True)
            assert "4/4 layers" in note, note
            note = dequant_cache.enable_fp8_backward(model, 2)
            assert note == "fp8 backward in 14 linear layers (emulated)", note

    _, loss, grads = grads_and_loss("off", "bf16", cache=not fp8_backward, prepare=prepare)
    return loss, grads, len(calls)


def test_lora_gradients_flow_through_the_fp8_backward(monkeypatch):
    loss_ref, g_ref, calls_ref = tiny_model_grads(False, monkeypatch)
    loss_fp8, g_fp8, calls = tiny_model_grads(True, monkeypatch)
    assert calls_ref == 0 and calls > 0
    assert loss_fp8 == loss_ref  # the forward is exact
    assert g_fp8.keys() == g_ref.keys() and any("lora_A" in k for k in g_fp8)
    errs = {k: rel_err(g_fp8[k], g_ref[k]) for k in g_ref}
    # the score head sits above every frozen projection: its gradient is exact; every LoRA tensor's comes through at
    # least one fp8 backward (layer 3's o_proj and MLP, and layer 2's too for layer 2): measured 3.6% to 8.5%
    assert errs.pop("base_model.model.score.modules_to_save.default.weight") == 0
    assert len(errs) == 12 and all(k.count(".lora_") == 1 for k in errs)
    for k, err in errs.items():
        assert g_fp8[k].abs().sum() > 0, k
        assert 0 < err < 0.15, (k, err)


@pytest.mark.parametrize("overrides, problem", [
    (["model.dequant_cache=off"], "model.dequant_cache auto or on (got off)"),
    (["train.precision=fp16"], "train.precision bf16 or auto (got fp16)"),
    (["model.quantization=none"], "model.quantization=nf4 (got none)"),
])
def test_fp8_backward_needs_the_cache_bf16_and_nf4(overrides, problem):
    base = ["model.fp8_backward=true", "model.dequant_cache=auto", "train.precision=bf16"]
    validate(load_config(CONFIGS / "gemma2_9b_fast.yaml", base))
    validate(load_config(CONFIGS / "gemma2_9b_fast.yaml", ["model.fp8_backward=true"]))  # what the bench runs
    with pytest.raises(ConfigError, match="model.fp8_backward=true") as e:
        validate(load_config(CONFIGS / "gemma2_9b_fast.yaml", base + overrides))
    assert problem in str(e.value)


def test_bench_numerics_check_shows_fp8_in_the_gradients_not_the_logits():
    """``orchestrator.bench --also model.fp8_backward=true`` compares the variant with ours: identical logits and loss,
    gradients a few percent apart (the tiny Gemma-2 in bf16 on the CPU; the GPU runs the same with _scaled_mm)."""
    from orchestrator.bench import numerics_text
    from orchestrator.perf.step_bench import compare_numerics, our_setup

    cfg = load_config(CONFIGS / "smoke.yaml", ["model.init=random", "train.precision=bf16", "model.dequant_cache=on"])
    device = torch.device("cpu")
    ours = our_setup(cfg, device)
    num = compare_numerics(cfg, ours, our_setup(cfg, device, {"model.fp8_backward": True}, "fp8"), device, grads=True)
    assert num["max_abs_logit_diff"] == 0 and num["rel_loss_diff"] == 0
    assert num["grad_tensors"] == 13 and 0.001 < num["rel_grad_diff"] < 0.1  # measured 1.7%
    assert "% apart (13 shared trained tensors)" in numerics_text(num)


def test_fp8_forward_layer_is_row_scaled_on_both_sides_and_close_to_the_exact_product():
    """``model.fp8_predict``'s layer: weight e4m3 with a scale per output feature, each input row quantized at the
    call; on the CPU the GPU path's rounding, multiplied in fp32."""
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(256, 512, generator=gen) / 512 ** 0.5).to(torch.bfloat16)
    bias = torch.randn(256, generator=gen).to(torch.bfloat16)
    # activations whose channels span three decades, and one row of zeros (a padded position)
    x = (torch.randn(2, 9, 512, generator=gen) * torch.logspace(-2, 1, 512)).to(torch.bfloat16)
    x[1, 3] = 0
    layer = fp8.Fp8Linear(w, bias)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_fp8.shape == (256, 512)
    assert layer.weight_scale.shape == (1, 256) and not layer.use_scaled_mm  # the CPU: the emulation
    assert layer.weight_fp8.float().abs().amax(dim=1).eq(448).all()  # each output feature's largest on e4m3's
    assert not list(layer.state_dict())  # never saved: rebuilt from the fold's weights at each load
    y = layer(x)
    exact = x.float() @ w.float().t() + bias.float()
    assert y.dtype == torch.bfloat16 and y.shape == (2, 9, 256)
    err = rel_err(y, exact)
    # measured 3.4% (two e4m3 roundings); a wrong scale or transposed layout is off by orders of magnitude, and the
    # bf16 product alone is 20x closer (0.16%): fp8 did run
    assert 0.01 < err < 0.06, err
    assert rel_err(torch.nn.functional.linear(x, w, bias), exact) < err / 10
    torch.testing.assert_close(y[1, 3].float(), bias.float(), rtol=0, atol=0)  # a zero row gives the bias exactly
    # the emulation is the rounding _scaled_mm computes: dequantized operands, multiplied exactly
    x_q, x_scale = fp8.quantize_rows(x.reshape(-1, 512), torch.float8_e4m3fn, fp8.E4M3_MAX)
    by_hand = (x_q.float() * x_scale) @ (layer.weight_fp8.float() * layer.weight_scale.t()).t() + bias.float()
    torch.testing.assert_close(y.float().reshape(-1, 256), by_hand, rtol=2 ** -8, atol=1e-3)


def _loaded_tiny_fold(tmp_path, overrides):
    """A tiny nf4 Gemma-2 fold model (LoRA on layers 2-3, smoke.yaml), saved as a fold saves it and loaded to
    predict with ``overrides``; its probabilities on 24 rows."""
    import numpy as np

    from tests.conftest import DATA
    from trainer_core.data.arena import load_rows
    from trainer_core.data.tokenization import build_tokenizer, encode
    from trainer_core.fold.inference import load_fold_model, predict_probs
    from trainer_core.model.build import build_model
    from trainer_core.model.precision import make_autocast

    cfg = load_config(CONFIGS / "smoke.yaml", ["train.precision=bf16", *overrides])
    adapter = tmp_path / "adapter"
    if not adapter.exists():
        tok = build_tokenizer(cfg.model)
        model = build_model(cfg.model, cfg.lora, pad_token_id=tok.pad_token_id, precision="bf16",
                            device=torch.device("cpu"), seed=cfg.train.seed)
        for name, p in model.named_parameters():  # adapters that are not zero, so they count in the output
            if p.requires_grad:
                p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        model.save_pretrained(adapter)
        tok.save_pretrained(adapter)
    model, tok, precision = load_fold_model(cfg, adapter, torch.device("cpu"))
    cpu = torch.device("cpu")
    ids = encode(load_rows(DATA).iloc[:24], tok, cfg)
    probs = predict_probs(model, ids, 8, tok.pad_token_id, cpu, make_autocast(precision, cpu))
    return model, np.asarray(probs)


def test_fp8_predict_runs_frozen_projections_in_fp8_and_leaves_lora_and_training_alone(tmp_path):
    from trainer_core import fastpath
    from trainer_core.model.build import decoder_layers

    exact_model, exact = _loaded_tiny_fold(tmp_path, ["model.dequant_cache=on"])
    model, probs = _loaded_tiny_fold(tmp_path, ["model.dequant_cache=on", "model.fp8_predict=true"])
    layers = decoder_layers(model)
    assert isinstance(layers[0].mlp.down_proj, fp8.Fp8Linear)  # a frozen layer, cached in fp8 by the cache itself
    q = layers[3].self_attn.q_proj  # an adapted one: peft's LoRA layer around the fp8 base
    assert isinstance(q.base_layer, fp8.Fp8Linear)
    assert type(q.lora_A["default"]) is torch.nn.Linear and q.lora_A["default"].weight.dtype != torch.float8_e4m3fn
    assert "fp8" not in exact_model.trainer_core_fastpath.steps
    assert model.trainer_core_fastpath.steps["dequant_cache"].startswith("dequantized weights cached in fp8: 4/4")
    # fp8 moves the probabilities (measured up to 0.033 on these random weights and adapters), not far
    diff = abs(probs - exact).max()
    assert 1e-4 < diff < 0.1, diff
    assert abs(probs.sum(axis=1) - 1).max() < 1e-6
    # a training placement never uses it: the fold's own held-out rows run on the exact weights
    cfg = load_config(CONFIGS / "smoke.yaml", ["train.precision=bf16", "model.dequant_cache=on",
                                               "model.fp8_predict=true"])
    from trainer_core.model.build import build_model

    trained = build_model(cfg.model, cfg.lora, pad_token_id=0, precision="bf16", device=torch.device("cpu"))
    placement = fastpath.place(cfg, trained, device=torch.device("cpu"), precision="bf16", seq_len=64, micro_batch=4)
    speed = fastpath.apply(trained, cfg, placement)
    assert "fp8" not in speed.steps and not any(isinstance(m, fp8.Fp8Linear) for m in trained.modules())


def test_fp8_predict_on_nf4_needs_the_weight_cache():
    validate(load_config(CONFIGS / "gemma2_9b_fast.yaml", ["model.fp8_predict=true"]))  # the fast config: auto
    with pytest.raises(ConfigError, match=r"model.fp8_predict=true keeps frozen nf4 weights in fp8 through "
                                          r"model.dequant_cache: set it to auto or on \(got off\)"):
        validate(load_config(CONFIGS / "smoke.yaml", ["model.fp8_predict=true"]))
    validate(load_config(CONFIGS / "demo_cpu.yaml", ["model.fp8_predict=true"]))  # no nf4: its plain linear layers


def test_fp8_predict_on_a_bf16_base_swaps_its_plain_linear_layers_but_not_loras():
    """A model without nf4 (``model.quantization=none``, LoRA on q/k/v): prediction's step 5 makes every plain linear
    layer of the decoder layers fp8 (the cache does not run without nf4); the adapters and the head stay."""
    from trainer_core import fastpath
    from trainer_core.model.build import build_model, decoder_layers

    cfg = load_config(CONFIGS / "smoke.yaml", ["train.precision=bf16", "model.quantization=none",
                                               "model.fp8_predict=true"])
    validate(cfg)
    cpu = torch.device("cpu")
    model = build_model(cfg.model, cfg.lora, pad_token_id=0, precision="bf16", device=cpu)
    x = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(input_ids=x).logits.float()
    placement = fastpath.place(cfg, model, device=cpu, precision="bf16", seq_len=64, micro_batch=4, training=False)
    speed = fastpath.apply(model, cfg, placement)
    assert "dequant_cache" not in speed.steps and speed.steps["fp8"] == "fp8 forward in 28 linear layers (emulated)"
    for layer in decoder_layers(model):
        assert isinstance(layer.mlp.down_proj, fp8.Fp8Linear) and type(layer.self_attn.o_proj) is fp8.Fp8Linear
    q = decoder_layers(model)[3].self_attn.q_proj
    assert isinstance(q.base_layer, fp8.Fp8Linear) and type(q.lora_B["default"]) is torch.nn.Linear
    assert type(model.base_model.model.score.modules_to_save["default"]) is torch.nn.Linear
    with torch.no_grad():
        got = model(input_ids=x).logits.float()
    moved = (got.softmax(-1) - exact.softmax(-1)).abs().max()
    assert 0 < moved < 0.05, moved  # measured ~0.008 (these random logits are near 0: compare probabilities)
