"""``model.fp8_backward`` and ``model.fp8_predict`` on a GPU: ``torch._scaled_mm`` (a private torch op,
docs/INTERNAL_APIS.md) computes the numbers the CPU tests check through the emulation, eager and compiled. Fails if a
torch upgrade changes or removes the op."""

import pytest
import torch

from trainer_core.fastpath import fp8

FP8_GPU = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="row-wise fp8 matmuls need a GPU of compute capability >= 8.9")


@pytest.mark.gpu
@FP8_GPU
def test_scaled_mm_gives_the_emulated_fp8_numbers_on_cuda():
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(256, 128, device="cuda", generator=gen).to(torch.bfloat16)  # out x in
    grad_y = torch.randn(4, 64, 256, device="cuda", generator=gen).to(torch.bfloat16)
    w_q, w_scale = fp8.quantize_weight(weight)
    assert fp8.scaled_mm_available(weight.device, weight.dtype)
    fast = fp8.grad_input(grad_y, w_q, w_scale, use_scaled_mm=True)
    emulated = fp8.grad_input(grad_y, w_q, w_scale, use_scaled_mm=False)
    assert fast.shape == emulated.shape == (4, 64, 128) and fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast, emulated, rtol=1.6e-2, atol=1e-2)  # the same products, fp32 sums, bf16 out
    exact = grad_y.float() @ weight.float()
    assert (fast.float() - exact).norm() / exact.norm() < 0.06  # fp8's rounding, not another computation


@pytest.mark.gpu
@FP8_GPU
def test_fp8_forward_layer_gives_the_emulated_numbers_on_cuda_eager_and_compiled():
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(512, 256, device="cuda", generator=gen) / 16).to(torch.bfloat16)  # out x in
    x = torch.randn(2, 100, 256, device="cuda", generator=gen).to(torch.bfloat16)  # 200 rows: not a multiple of 16
    layer = fp8.Fp8Linear(weight, None)
    assert layer.use_scaled_mm
    fast = layer(x)
    emulated = fp8.linear(x, layer.weight_fp8, layer.weight_scale, None, use_scaled_mm=False)
    assert fast.shape == emulated.shape == (2, 100, 512) and fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast, emulated, rtol=1.6e-2, atol=1e-2)
    compiled = torch.compile(layer)(x)  # a loaded fold model's layers are compiled: inductor fuses the quantization
    torch.testing.assert_close(compiled, emulated, rtol=1.6e-2, atol=1e-2)
    exact = x.float() @ weight.float().t()
    assert (fast.float() - exact).norm() / exact.norm() < 0.06
