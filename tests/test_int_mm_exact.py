"""The torch backend's int8 GEMM against an exact int64 reference, for shapes with size-1 dimensions.

Size-1 dimensions are where strides stop meaning anything (`.contiguous()` keeps a (1, N) view's
strides (1, 1)), and where a GEMM that reads its leading dimensions from the strides can sum the
wrong elements: SwitchBackLinear(1, 16) on the CPU once came out off by 1e5-1e9 that way.
"""

import itertools

import pytest
import torch

from lowbit._backend import use_backend
from lowbit.int8 import ops

# M, K, N from 1 and odd sizes (and one 8-aligned size), every combination that holds at least one 1.
SIZES = (1, 3, 8, 17, 33)
SHAPES = [s for s in itertools.product(SIZES, repeat=3) if 1 in s]
# How an operand is laid out: row-major, a transposed view (the layers pass w_int8.t()), or
# as_strided with stride 1 on a size-1 dimension, the way those views come out of .t().
LAYOUTS = ("rowmajor", "transposed", "unit_strides")


def _int8(rows, cols, layout, g):
    if layout == "transposed":
        return torch.randint(-127, 128, (cols, rows), generator=g, dtype=torch.int8).t()
    t = torch.randint(-127, 128, (rows, cols), generator=g, dtype=torch.int8)
    if layout == "unit_strides" and 1 in (rows, cols):
        t = t.as_strided((rows, cols), (1, 1))  # same elements: only the stride of the size-1 dim changes
    return t


def _exact(a, b):
    return a.to(torch.int64) @ b.to(torch.int64)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int_mm_exact_size_one_dims(shape):
    m, k, n = shape
    g = torch.Generator().manual_seed(SHAPES.index(shape))
    for layout_a, layout_b in itertools.product(LAYOUTS, LAYOUTS):
        a, b = _int8(m, k, layout_a, g), _int8(k, n, layout_b, g)
        got = ops._int_mm_exact(a, b)
        assert got.dtype == torch.int32 and got.shape == (m, n)
        assert torch.equal(got.to(torch.int64), _exact(a, b)), (layout_a, layout_b, a.stride(), b.stride())


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, ops.MAX_INNER_DIM, 1), (3, ops.MAX_INNER_DIM, 1)])
def test_int_mm_exact_at_the_int32_bound(shape):
    """All-127 operands at the largest allowed K: the sums reach K * 127**2, just below 2**31."""
    m, k, n = shape
    a = torch.full((m, k), 127, dtype=torch.int8)
    b = torch.full((n, k), -127, dtype=torch.int8).t()
    got = ops._int_mm_exact(a, b)
    assert torch.equal(got.to(torch.int64), torch.full((m, n), -k * 127**2, dtype=torch.int64))


@pytest.mark.parametrize("shape", [(1, 1, 16), (4, 1, 16), (7, 1, 1), (1, 9, 1), (1, 33, 17), (17, 33, 1)])
def test_int8_matmul_dequant_size_one_dims(shape):
    """The whole torch-backend op: exact integer sums, then one fp32 scaling, against fp64."""
    m, k, n = shape
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    a_absmax, b_absmax = torch.rand(m, generator=g) + 0.5, torch.rand((), generator=g) + 0.5
    with use_backend("torch"):
        got = ops.int8_matmul_dequant(a, w.t(), a_absmax, b_absmax)
    ref = _exact(a, w.t()).double() * a_absmax.double()[:, None] * b_absmax.double() / 127**2
    torch.testing.assert_close(got.double(), ref, rtol=2e-7, atol=1e-6)


def test_switchback_linear_one_input_feature():
    """The case that was seen wrong: SwitchBackLinear(1, 16), output within int8 error of nn.Linear."""
    from lowbit.nn.switchback import SwitchBackLinear

    torch.manual_seed(0)
    layer = SwitchBackLinear(1, 16)
    x = torch.randn(64, 1)
    with use_backend("torch"):
        got = layer(x)
    ref = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    # One input feature: the only error is the int8 rounding of x and w (<= 1/254 of each absmax).
    bound = (x.abs().max() * layer.weight.abs().max()).item() * 3 / 254
    assert (got.double() - ref).abs().max().item() < bound
