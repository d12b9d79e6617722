"""Helpers shared by the kernel tests: where kernels run, the torch twin, fp64 checks of int8 values."""

from __future__ import annotations

import torch

import lowbit
from lowbit.int8 import ops
from tests.reference import quantize_ref

# Compiled kernels on a GPU; on CPU tensors through Triton's interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 when there is no CUDA), so the same test checks whichever one CI has.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def twin(op: str, *args, **kwargs):
    """The plain-torch twin of `op` in lowbit.int8.ops (the contract)."""
    with lowbit.use_backend("torch"):
        return getattr(ops, op)(*args, **kwargs)


def via_ops(op: str, *args, **kwargs):
    """`op` dispatched by lowbit.int8.ops to its Triton kernel."""
    with lowbit.use_backend("triton"):
        return getattr(ops, op)(*args, **kwargs)


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same shape, dtype and values; NaN matches NaN (payloads aside)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    got, want = got.cpu(), want.cpu()
    if got.is_floating_point():
        assert torch.equal(got.isnan(), want.isnan()), "NaN in different places"
        got, want = got.nan_to_num(nan=0.0), want.nan_to_num(nan=0.0)
    diff = (got != want).nonzero()
    assert diff.numel() == 0, f"{len(diff)} of {got.numel()} differ, first at {diff[0].tolist()}"


def assert_same_quantization(got, want) -> None:
    """(q, absmax) pairs agree bit for bit; q is contiguous int8."""
    (q, absmax), (q_want, absmax_want) = got, want
    assert q.is_contiguous()
    assert_bitwise_equal(q, q_want)
    assert_bitwise_equal(absmax, absmax_want)


def check_against_fp64(q: torch.Tensor, absmax: torch.Tensor, x: torch.Tensor, dim: int | None) -> int:
    """q (laid out like x) against the fp64 rule round(127 x / absmax) over `dim`; returns the mismatches.

    The kernels compute in fp32, so q may differ from the fp64 value by 1, and only where 127 x / absmax
    sits within fp32 rounding of a half-integer. absmax, a max of exactly converted values, is exact.
    """
    q_ref, absmax_keepdim = quantize_ref(x.cpu(), dim)
    assert torch.equal(absmax.cpu().double(), absmax_keepdim.reshape(absmax.shape))
    diff = (q.cpu().double() - q_ref).abs()
    assert diff.max() <= 1
    off = diff > 0
    if off.any():
        y = (127.0 * x.cpu().double() / absmax_keepdim).abs()
        distance_to_tie = (y - y.floor() - 0.5).abs()
        assert distance_to_tie[off].max() < 1e-4, "a mismatch away from a rounding tie"
    return int(off.sum())
