"""lowbit.int8.ops.mm_dequantized on the Triton kernel (x dequantized inside the GEMM) against an fp64
product of the twin's dequantized operand, and mem-efficient SwitchBack's weight gradient through it."""

import pytest
import torch

import lowbit
from lowbit.nn import SwitchBackLinear
from tests.kernels._utils import DEVICE, twin, via_ops

# the output's own rounding, plus fp32 sums in another order
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 1), (5, 3, 7), (37, 70, 33), (64, 64, 64), (20, 130, 45)])
def test_matches_the_product_of_the_twins_dequantized_operand(m, k, n, dtype):
    torch.manual_seed(4)
    a = (torch.randn(k, m) * 2).to(dtype).to(DEVICE).t()  # strided, as g.t() is
    q = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=DEVICE)
    absmax = (torch.rand(k) * 10 + 0.1).to(DEVICE)
    absmax[0] = 0.0  # an all-zero row of x
    got = via_ops("mm_dequantized", a, q, absmax)
    assert got.dtype == dtype and got.shape == (m, n) and got.is_contiguous()
    x_hat = twin("dequantize_rowwise", q, absmax, dtype)
    exact = a.cpu().double() @ x_hat.cpu().double()
    err = (got.cpu().double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)
    assert err <= TOLERANCE[dtype], err
    want = twin("mm_dequantized", a, q, absmax)
    scale = exact.abs().max().clamp_min(1e-30)
    assert ((got.cpu().double() - want.cpu().double()).abs().max() / scale) <= 2 * TOLERANCE[dtype]


def test_empty_and_bad_inputs():
    q = torch.zeros(4, 3, dtype=torch.int8, device=DEVICE)
    ones = torch.ones(4, device=DEVICE)
    assert via_ops("mm_dequantized", torch.randn(0, 4, device=DEVICE), q, ones).shape == (0, 3)
    zero_k = via_ops("mm_dequantized", torch.randn(5, 0, device=DEVICE), q[:0], ones[:0])
    assert torch.equal(zero_k.cpu(), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="cannot multiply"):
        via_ops("mm_dequantized", torch.randn(2, 5, device=DEVICE), q, ones)
    with pytest.raises(ValueError, match="absmax"):
        via_ops("mm_dequantized", torch.randn(2, 4, device=DEVICE), q, ones[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memeff_weight_gradient_through_the_kernel(dtype, monkeypatch):
    from lowbit import kernels

    calls = []
    launch = kernels.launch_mm_dequant_rows
    monkeypatch.setattr(kernels, "launch_mm_dequant_rows", lambda *a: calls.append(1) or launch(*a))
    torch.manual_seed(5)
    layer = SwitchBackLinear(40, 24, mem_efficient=True, dtype=dtype, device=DEVICE)
    x = torch.randn(3, 11, 40, dtype=dtype, device=DEVICE)
    g = torch.randn(3, 11, 24, dtype=dtype, device=DEVICE)
    grads = []
    for backend in ("torch", "triton"):
        with lowbit.use_backend(backend):
            layer(x.clone().requires_grad_()).backward(g)
        grads.append(layer.weight.grad.cpu().double())
        layer.zero_grad(set_to_none=True)
    assert calls == [1]
    err = (grads[1] - grads[0]).abs().max() / grads[0].abs().max()
    assert err <= 2 * TOLERANCE[dtype], err
