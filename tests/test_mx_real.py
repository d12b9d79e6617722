"""fp8-blockwise on Hopper's tensor cores (lowbit.mx.real): the operands it hands torch's scaled_mm,
in the layouts torch documents, carry exactly the simulation's values; the first-use check keeps a
kernel that disagrees (or refuses) from ever returning a number. The real kernel is run by the
gpu-marked test (compute capability 9.x)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.mx import ops, real
from lowbit.nn import BlockScaledLinear
from tests.reference import sqnr_db

TILE = 128


def documented_scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, *, swizzle_a, swizzle_b, output_dtype):
    """scaled_mm's blockwise semantics as torch's OpInfo samples lay them out (sm_90), in fp64, with
    every layout requirement asserted."""
    (m, k), n = a.shape, b.shape[1]
    assert a.dtype == b.dtype == torch.float8_e4m3fn and output_dtype == torch.bfloat16
    assert recipe_a == [F.ScalingType.BlockWise1x128] and recipe_b == [F.ScalingType.BlockWise128x128]
    assert a.stride() == (k, 1) and b.stride() == (1, k)  # A row-major, B column-major
    (sa,), (sb,) = scale_a, scale_b
    assert sa.shape == (m, k // TILE) and sa.stride(0) == 1  # M-major
    padded = 4 * math.ceil(k // TILE / 4)
    assert sb.shape == (padded, n // TILE) and sb.t().is_contiguous()
    a_dec = a.double() * sa.double().repeat_interleave(TILE, dim=1)
    b_dec = b.double() * sb[: k // TILE].double().repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)
    return (a_dec @ b_dec).to(torch.bfloat16)


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(real, "_VERDICTS", {})


@pytest.mark.parametrize("weight", [False, True])
def test_parts_are_the_simulations_values(weight):
    torch.manual_seed(0)
    x = torch.randn(256, 384) * torch.logspace(-3, 3, 384)
    x[3, 5] = 0.0
    x[:128, 128:256] = 0.0  # an all-zero tile / block stays zero
    q, scale = real.fp8_blockwise_parts(x, weight=weight)
    rows = TILE if weight else 1
    dequant = q.float() * scale.repeat_interleave(rows, 0).repeat_interleave(TILE, 1)
    x_hat, _ = ops.quantize(x, "fp8-blockwise", weight=weight)
    assert torch.equal(dequant, x_hat)


@pytest.mark.parametrize("k", [256, 384, 640])  # K/128 = 2, 3, 5: scale_b padded to 4 and 8
def test_the_documented_kernel_gives_the_simulation(k):
    torch.manual_seed(1)
    a, w = torch.randn(48, k), torch.randn(256, k) * 0.02
    bias = torch.randn(256)
    got = real.fp8_blockwise_scaled_mm(a, w, bias=bias, scaled_mm=documented_scaled_mm)
    want = ops.block_mm(a, w, "fp8-blockwise", out_dtype=torch.float32, bias=bias)
    assert got.dtype == torch.bfloat16
    assert sqnr_db(want.double(), got.double()) > 45  # bf16 output rounding apart


def _checked(a, w, scaled_mm, calls):
    def simulate(a, w, bias):
        calls.append(tuple(a.shape))
        return ops.block_mm(a, w, "fp8-blockwise", out_dtype=torch.bfloat16, bias=bias)

    return real.checked_fp8_blockwise_mm(a, w, bias=None, simulate=simulate, scaled_mm=scaled_mm)


def test_an_agreeing_kernel_is_probed_once_then_used():
    a, w = torch.randn(32, 256), torch.randn(128, 256)
    calls = []
    for _ in range(3):
        out = _checked(a, w, documented_scaled_mm, calls)
    assert calls == [(128 + 32, 256)]  # the probe only, once: M of the caller's alignment
    assert sqnr_db(ops.block_mm(a, w, "fp8-blockwise", out_dtype=torch.float32).double(), out.double()) > 45


def _block_scales_swapped(a, b, scale_a, recipe_a, scale_b, recipe_b, **kwargs):
    """Reads B's 128x128 scales transposed: invisible when all blocks have about the same scale."""
    (sb,) = scale_b
    k_tiles, n_tiles = a.shape[1] // TILE, b.shape[1] // TILE
    assert k_tiles == n_tiles  # square block grids only: the transposed grid has the same shape
    wrong = F.pad(sb[:k_tiles].t(), (0, 0, 0, sb.shape[0] - k_tiles)).t().contiguous().t()
    return documented_scaled_mm(a, b, scale_a, recipe_a, [wrong], recipe_b, **kwargs)


def _no_nan(a, b, *args, **kwargs):
    return documented_scaled_mm(a, b, *args, **kwargs).nan_to_num(0.0)


@pytest.mark.parametrize("failure", ["refused", "zeros", "block scales swapped", "NaN dropped"])
def test_a_wrong_kernel_is_caught_by_the_probe_even_on_uniform_weights(failure):
    def refused(*args, **kwargs):
        raise RuntimeError("scaled_mm: unsupported layout")

    def zeros(a, b, *args, **kwargs):
        return torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16)

    kernel = {"refused": refused, "zeros": zeros, "block scales swapped": _block_scales_swapped,
              "NaN dropped": _no_nan}[failure]
    torch.manual_seed(3)
    a, w = torch.randn(64, 256), torch.nn.Linear(256, 256).weight.detach()  # fresh init: even block scales
    want = ops.block_mm(a, w, "fp8-blockwise", out_dtype=torch.bfloat16)
    if failure == "block scales swapped":  # on this data the wrong kernel looks right: hence the probe
        looks = real.fp8_blockwise_scaled_mm(a, w, scaled_mm=_block_scales_swapped)
        assert sqnr_db(want.double(), looks.double()) > 40
    calls = []
    with pytest.warns(UserWarning, match="disagreed with the simulation"):
        first = _checked(a, w, kernel, calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        second = _checked(a, w, kernel, calls)
    assert torch.equal(first, want) and torch.equal(second, want)


def test_which_gemms_the_kernel_takes(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    a, w = torch.randn(8, 256), torch.randn(384, 256)
    assert real.real_fp8_blockwise_reason(a, w, torch.bfloat16, True, (9, 0)) is None
    assert "Hopper" in real.real_fp8_blockwise_reason(a, w, torch.bfloat16, True, (10, 0))
    assert "multiples of 128" in real.real_fp8_blockwise_reason(a[:, :200], w[:, :200], torch.bfloat16, True, (9, 0))
    assert "multiples of 128" in real.real_fp8_blockwise_reason(a, w[:300], torch.bfloat16, True, (9, 0))
    assert "bfloat16" in real.real_fp8_blockwise_reason(a, w, torch.float32, True, (9, 0))
    assert "weight gradient" in real.real_fp8_blockwise_reason(a, w, torch.bfloat16, False, (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert "12.9" in real.real_fp8_blockwise_reason(a, w, torch.bfloat16, True, (9, 0))


@pytest.mark.parametrize("m, k, n", [(8, 256, 0), (0, 256, 128), (8, 0, 128)])
def test_an_empty_gemm_is_left_to_the_simulation(monkeypatch, m, k, n):
    """0 passes every `% 128` test, but an empty GEMM is nothing for the tensor cores to do (nor for the
    first-use probe to judge: with N = 0 it has no 128-column slice to compare and raised ValueError)."""
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    a, w = torch.randn(m, k), torch.randn(n, k)
    assert "empty" in real.real_fp8_blockwise_reason(a, w, torch.bfloat16, True, (9, 0))
    bias = torch.randn(n)
    out = ops.block_mm(a.bfloat16(), w.bfloat16(), "fp8-blockwise", out_dtype=torch.bfloat16, bias=bias.bfloat16())
    assert out.shape == (m, n)
    assert torch.equal(out, bias.bfloat16().expand(m, n))  # K = 0: the bias alone; else nothing


@pytest.mark.gpu
def test_on_hopper_the_layer_runs_on_tensor_cores_and_matches_the_simulation():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the 1x128 / 128x128 fp8 kernels are Hopper's (compute capability 9.x)")
    torch.manual_seed(2)
    layer = BlockScaledLinear(512, 768, format="fp8-blockwise", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first-use check agreed: no warning
        out = layer(x)
        out.float().square().sum().backward()
    assert real._VERDICTS and all(v is True for v in real._VERDICTS.values())
    with lowbit.use_backend("torch"):
        xs = x.detach().clone().requires_grad_()
        want = layer(xs)
        want.float().square().sum().backward()
    assert sqnr_db(want.double(), out.double()) > 40
    assert sqnr_db(xs.grad.double(), x.grad.double()) > 35


@pytest.mark.gpu
def test_on_hopper_a_gemm_the_kernel_does_not_take_is_simulated_with_a_note():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the 1x128 / 128x128 fp8 kernels are Hopper's (compute capability 9.x)")
    ops.note_simulated.cache_clear()
    layer = BlockScaledLinear(200, 256, format="fp8-blockwise", device="cuda", dtype=torch.bfloat16)  # K % 128
    x = torch.randn(64, 200, device="cuda", dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="does not take: inner dimension 200"):
        out = layer(x)
    with lowbit.use_backend("torch"):
        assert torch.equal(out, layer(x))  # the simulation, exactly
