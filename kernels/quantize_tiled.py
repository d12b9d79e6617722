"""Column-wise and tensor-wise absmax int8 quantization: one tiled two-pass kernel pair, the scale's
granularity a compile-time switch, q optionally written transposed.

The two granularities are the same loop over (BLOCK_SIZE_M, BLOCK_SIZE_K) tiles and differ only in
the reduction: a tile's column maxima go to one atomic per column (PER_COLUMN) or, reduced once
more, to one atomic for the tensor. Pass 1 (absmax) needs every element before pass 2 (quantize)
may write any q. Both read x along its contiguous dimension, and the tiled grid fills the GPU
whatever the aspect ratio (bitsandbytes' one-program-per-column kernel did neither). Row-wise
quantization is a different loop (a program owns whole rows, one pass): quantize_rowwise.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    LAUNCH_OPTIONS,
    _boost,
    _load_tile,
    _nan_to_inf_abs,
    _quantize,
    _scale_inverse,
    _scale_out,
    check_float_matrix,
)

if INTERPRET:
    # Big tiles: numpy runs each program in Python; tests still span several tiles each way.
    _ABSMAX_CONFIGS = [triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_K": 64}, num_warps=4)]
    _QUANTIZE_CONFIGS = [triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_K": 64}, num_warps=4)]
else:
    _ABSMAX_CONFIGS = [
        triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_K": 256}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_K": 128}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_K": 256}, num_warps=8),
        triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_K": 64}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_K": 128}, num_warps=8),
        triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_K": 256}, num_warps=8),
        triton.Config({"BLOCK_SIZE_M": 256, "BLOCK_SIZE_K": 64}, num_warps=8),
        # 256 x 128 at 8 warps spilled 4 bytes on sm_90 (tests/kernels/test_compile_targets.py)
        triton.Config({"BLOCK_SIZE_M": 256, "BLOCK_SIZE_K": 128}, num_warps=16),
    ]
    # Square-ish tiles suit the transposed store: Triton stages the tile through shared memory so
    # both the load (along K) and the store (along M) stay coalesced.
    _QUANTIZE_CONFIGS = [
        triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_K": 256}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_K": 64}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_K": 128}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_K": 64}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_K": 128}, num_warps=8),
    ]


@triton.autotune(configs=_ABSMAX_CONFIGS, key=["M", "K", "PER_COLUMN"])
@triton.jit
def _tiled_absmax_kernel(
    x_ptr, absmax_bits_ptr,
    M, K,
    stride_xm, stride_xk,
    PER_COLUMN: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """absmax_bits[k] (PER_COLUMN) or absmax_bits[0] = max |x| over its group (NaN as inf), as int32 bits."""
    x, _, offs_k, _ = _load_tile(x_ptr, M, K, stride_xm, stride_xk, BLOCK_SIZE_M, BLOCK_SIZE_K)
    col_max = tl.max(_nan_to_inf_abs(x), axis=0)
    # Non-negative floats (inf included) order like their int32 bits, so an integer atomic max gives
    # the float max; max is idempotent, so autotuning's re-runs are harmless.
    if PER_COLUMN:
        tl.atomic_max(absmax_bits_ptr + offs_k, col_max.to(tl.int32, bitcast=True), mask=offs_k < K)
    else:
        tl.atomic_max(absmax_bits_ptr, tl.max(col_max, axis=0).to(tl.int32, bitcast=True))


@triton.jit
def _quantize_tiled_body(
    x_ptr, absmax_bits_ptr, q_ptr, q_t_ptr, absmax_ptr,
    M, K,
    stride_xm, stride_xk,
    PER_COLUMN: tl.constexpr, TRANSPOSE: tl.constexpr, BOTH: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """q = clamp(rint(x * 127 / absmax)) per column or per tensor: (M, K) row-major, or (K, M) if TRANSPOSE;
    with BOTH, q (M, K) to q_ptr and q^T (K, M) to q_t_ptr from the same tile (SwitchBack's weight:
    q for the forward, q^T saved for grad_input)."""
    x, offs_m, offs_k, mask = _load_tile(x_ptr, M, K, stride_xm, stride_xk, BLOCK_SIZE_M, BLOCK_SIZE_K)
    mask_k = offs_k < K
    if PER_COLUMN:
        absmax = tl.load(absmax_bits_ptr + offs_k, mask=mask_k, other=0).to(tl.float32, bitcast=True)
        q = _quantize(x, _scale_inverse(absmax)[None, :], _boost(absmax)[None, :])
    else:
        absmax = tl.load(absmax_bits_ptr).to(tl.float32, bitcast=True)
        q = _quantize(x, _scale_inverse(absmax), _boost(absmax))
    if TRANSPOSE:  # contiguous along m; Triton reshuffles the tile through shared memory
        q_ptrs = q_ptr + offs_k[None, :] * M + offs_m[:, None]
    else:
        q_ptrs = q_ptr + offs_m[:, None] * K + offs_k[None, :]
    tl.store(q_ptrs, q, mask=mask)
    if BOTH:
        tl.store(q_t_ptr + offs_k[None, :] * M + offs_m[:, None], q, mask=mask)
    # The first row of programs writes the scales of its columns (or the first program the tensor's).
    if PER_COLUMN:
        if tl.program_id(0) == 0:
            tl.store(absmax_ptr + offs_k, _scale_out(absmax), mask=mask_k)
    else:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(absmax_ptr, _scale_out(absmax))


_KEY = ["M", "K", "PER_COLUMN", "TRANSPOSE", "BOTH"]
_quantize_tiled_kernel = triton.autotune(configs=_QUANTIZE_CONFIGS, key=_KEY)(_quantize_tiled_body)
# Two stores per tile: 64 x 128 at 4 warps spilled 48 bytes on sm_90 (tests/kernels/test_compile_targets.py).
_quantize_tiled_both_kernel = triton.autotune(
    configs=[c for c in _QUANTIZE_CONFIGS if INTERPRET or (c.kwargs["BLOCK_SIZE_M"], c.kwargs["BLOCK_SIZE_K"],
                                                          c.num_warps) != (64, 128, 4)],
    key=_KEY,
)(_quantize_tiled_body)


def launch_quantize_tiled(
    x: torch.Tensor, *, per_column: bool, transpose: bool, both: bool = False
) -> tuple[torch.Tensor, ...]:
    """The two passes on an x already checked (a 2-D float tensor on a device Triton runs on):
    (q, absmax), or (q, q^T, absmax) if both."""
    M, K = x.shape
    q = torch.empty((K, M) if transpose else (M, K), dtype=torch.int8, device=x.device)
    q_t = torch.empty((K, M), dtype=torch.int8, device=x.device) if both else q
    scale_shape = (K,) if per_column else ()
    if M == 0 or K == 0:  # nothing to read: an empty group has absmax 0, like the torch twin
        absmax = torch.zeros(scale_shape, dtype=torch.float32, device=x.device)
        return (q, q_t, absmax) if both else (q, absmax)
    # Written in full by pass 2 (every column has a program in the first row of the grid).
    absmax = torch.empty(scale_shape, dtype=torch.float32, device=x.device)
    absmax_bits = torch.zeros(scale_shape, dtype=torch.int32, device=x.device)  # +0.0; |x| >= 0

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_SIZE_M"]), triton.cdiv(K, meta["BLOCK_SIZE_K"]))

    _tiled_absmax_kernel[grid](
        x_ptr=x, absmax_bits_ptr=absmax_bits,
        M=M, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        PER_COLUMN=per_column,
        **LAUNCH_OPTIONS,
    )
    kernel = _quantize_tiled_both_kernel if both else _quantize_tiled_kernel
    kernel[grid](
        x_ptr=x, absmax_bits_ptr=absmax_bits, q_ptr=q, q_t_ptr=q_t, absmax_ptr=absmax,
        M=M, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        PER_COLUMN=per_column, TRANSPOSE=transpose, BOTH=both,
        **LAUNCH_OPTIONS,
    )
    return (q, q_t, absmax) if both else (q, absmax)


def launch_quantize_colwise_transposed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_quantize_tiled(x, per_column=True, transpose=True)


def launch_quantize_tensorwise(x: torch.Tensor, *, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_quantize_tiled(x, per_column=False, transpose=bool(transpose))


def launch_quantize_tensorwise_and_transpose(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_quantize_tiled(x, per_column=False, transpose=False, both=True)


def quantize_tensorwise_and_transpose(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensor-wise absmax int8 written both ways in one pass: x (M, K) -> q (M, K), q^T (K, M), both
    contiguous, and absmax () fp32 (the same values as quantize_tensorwise, with and without transpose)."""
    check_float_matrix(x, "quantize_tensorwise_and_transpose")
    return launch_quantize_tensorwise_and_transpose(x)


def quantize_colwise_transposed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-wise absmax int8, transposed: x (M, K) float, any strides -> q (K, M) int8 contiguous,
    absmax (K,) fp32.

    Args:
        x: (M, K) float32, float16 or bfloat16 tensor.

    Returns:
        q with q[k, m] = clamp(rint(x[m, k] * 127 / absmax[k]), -127, 127), and absmax, the fp32 max
        of |x[:, k]| (0 for an all-zero column, NaN for one holding inf or NaN, whose q row is 0).
    """
    check_float_matrix(x, "quantize_colwise_transposed")
    return launch_quantize_colwise_transposed(x)


def quantize_tensorwise(x: torch.Tensor, *, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-wise absmax int8: x (M, K) float, any strides -> q (M, K), or (K, M) if transpose, int8
    contiguous, and absmax () fp32.

    Args:
        x: (M, K) float32, float16 or bfloat16 tensor.
        transpose: write q^T, (K, M) contiguous, in the same pass (a K-major operand for grad_input).

    Returns:
        q = clamp(rint(x * 127 / absmax), -127, 127) and absmax = max |x| in fp32 (0 for an all-zero or
        empty x; NaN, with q all 0, if x holds inf or NaN).
    """
    check_float_matrix(x, "quantize_tensorwise")
    return launch_quantize_tensorwise(x, transpose=transpose)
