"""quantize_rowwise_column_sums: the row-wise int8 of x, bit for bit as quantize_rowwise, and x's
column sums (SwitchBack's grad_bias) from the same read, against an fp64 sum."""

import importlib

import pytest
import torch

from lowbit import kernels
from tests.kernels._utils import DEVICE, FLOAT_DTYPES, assert_same_quantization, twin, via_ops

# the module (lowbit.kernels re-exports its function under the same name)
rowwise_module = importlib.import_module("lowbit.kernels.quantize_rowwise")
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

# One program and several (rows_per_program is 32 at these sizes), K inside one 64-wide tile and
# past it (the loop, whose partial sums go through the program's row of the buffer).
SHAPES = [(1, 1), (5, 3), (31, 64), (33, 65), (100, 130), (200, 7)]


def _fp32_sum_bound(x: torch.Tensor) -> torch.Tensor:
    """|fp32 sum - exact sum| <= (M - 1) * 2**-24 * sum |x| per column (any order of additions)."""
    return (x.shape[0] * 2.0**-24) * x.double().abs().sum(dim=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantization_is_quantize_rowwise_and_sums_are_exact_to_fp32(shape, dtype):
    torch.manual_seed(3)
    x = (torch.randn(shape) * 3 + 0.5).to(dtype).to(DEVICE)
    q, absmax, sums = kernels.quantize_rowwise_column_sums(x)
    assert_same_quantization((q, absmax), kernels.quantize_rowwise(x))
    assert sums.shape == (shape[1],) and sums.dtype == torch.float32
    exact = x.cpu().double().sum(dim=0)
    assert ((sums.cpu().double() - exact).abs() <= _fp32_sum_bound(x.cpu()) + 1e-30).all()
    # the torch twin: the same quantization, sums by torch
    q_t, absmax_t, sums_t = twin("quantize_rowwise_column_sums", x)
    assert_same_quantization((q_t, absmax_t), (q, absmax))
    assert ((sums_t.cpu().double() - exact).abs() <= _fp32_sum_bound(x.cpu()) + 1e-30).all()
    assert_same_quantization(via_ops("quantize_rowwise_column_sums", x)[:2], (q, absmax))


def test_many_programs_and_a_strided_input():
    torch.manual_seed(4)
    x = torch.randn(150, 97, device=DEVICE).t()  # (97, 150), strided along K
    rows = rowwise_module.rows_per_program(x.shape[0])
    assert x.shape[0] > rows  # more than one program, so the reduce over programs runs
    q, absmax, sums = kernels.quantize_rowwise_column_sums(x)
    assert_same_quantization((q, absmax), kernels.quantize_rowwise(x.contiguous()))
    exact = x.cpu().double().sum(dim=0)
    assert ((sums.cpu().double() - exact).abs() <= _fp32_sum_bound(x.cpu())).all()


def test_inf_and_nan_reach_their_column_sums_only():
    x = torch.ones(40, 70, device=DEVICE)
    x[3, 5] = float("inf")
    x[30, 66] = float("nan")
    _, absmax, sums = kernels.quantize_rowwise_column_sums(x)
    assert sums[5] == float("inf") and sums[66].isnan()
    others = torch.ones(70, dtype=torch.bool)
    others[[5, 66]] = False
    assert (sums.cpu()[others] == 40).all()
    assert absmax[3].isnan() and absmax[30].isnan()


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_empty(shape):
    x = torch.randn(shape, device=DEVICE)
    q, absmax, sums = kernels.quantize_rowwise_column_sums(x)
    assert q.shape == shape and absmax.shape == (shape[0],)
    assert torch.equal(sums.cpu(), torch.zeros(shape[1]))


def test_refuses_what_quantize_rowwise_refuses():
    with pytest.raises(ValueError, match="2-D"):
        kernels.quantize_rowwise_column_sums(torch.ones(2, 3, 4, device=DEVICE))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kernels.quantize_rowwise_column_sums(torch.ones(4, 4, dtype=torch.float64, device=DEVICE))
