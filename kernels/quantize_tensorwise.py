"""Tensor-wise absmax int8 quantization: one scale for the whole tensor, q optionally written transposed."""

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

# Two passes over (BLOCK_SIZE_M, BLOCK_SIZE_K) tiles: the absmax needs every element before any q.
if INTERPRET:
    # Big tiles: numpy runs each program in Python; tests still span several tiles each way.
    _ABSMAX_CONFIGS = [triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_K": 64}, num_warps=4)]
    _QUANTIZE_CONFIGS = [triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_K": 64}, num_warps=4)]
else:
    _ABSMAX_CONFIGS = [
        triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_K": 256}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_K": 128}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_K": 256}, num_warps=8),
        triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_K": 128}, num_warps=8),
        triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_K": 256}, num_warps=8),
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


@triton.autotune(configs=_ABSMAX_CONFIGS, key=["M", "K"])
@triton.jit
def _tensor_absmax_kernel(
    x_ptr, absmax_bits_ptr,
    M, K,
    stride_xm, stride_xk,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """absmax_bits = max over tiles of max |x| (NaN as inf), as the int32 bits of a non-negative fp32."""
    x, _, _, _ = _load_tile(x_ptr, M, K, stride_xm, stride_xk, BLOCK_SIZE_M, BLOCK_SIZE_K)
    tile_max = tl.max(tl.max(_nan_to_inf_abs(x), axis=1), axis=0)
    # Non-negative floats (inf included) order like their bits as int32, so an integer atomic max
    # gives the float max; max is idempotent, so autotuning's re-runs are harmless.
    tl.atomic_max(absmax_bits_ptr, tile_max.to(tl.int32, bitcast=True))


@triton.autotune(configs=_QUANTIZE_CONFIGS, key=["M", "K", "TRANSPOSE"])
@triton.jit
def _quantize_tensorwise_kernel(
    x_ptr, absmax_bits_ptr, q_ptr, absmax_ptr,
    M, K,
    stride_xm, stride_xk,
    TRANSPOSE: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """q = clamp(rint(x * 127 / absmax)): (M, K) row-major, or (K, M) row-major (= x^T) if TRANSPOSE."""
    x, offs_m, offs_k, mask = _load_tile(x_ptr, M, K, stride_xm, stride_xk, BLOCK_SIZE_M, BLOCK_SIZE_K)
    absmax = tl.load(absmax_bits_ptr).to(tl.float32, bitcast=True)
    q = _quantize(x, _scale_inverse(absmax), _boost(absmax))
    if TRANSPOSE:
        q_ptrs = q_ptr + offs_k[None, :] * M + offs_m[:, None]
    else:
        q_ptrs = q_ptr + offs_m[:, None] * K + offs_k[None, :]
    tl.store(q_ptrs, q, mask=mask)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(absmax_ptr, _scale_out(absmax))


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
    M, K = x.shape
    q = torch.empty((K, M) if transpose else (M, K), dtype=torch.int8, device=x.device)
    absmax = torch.zeros((), dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, absmax
    absmax_bits = torch.zeros((), dtype=torch.int32, device=x.device)  # +0.0; |x| >= 0

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_SIZE_M"]), triton.cdiv(K, meta["BLOCK_SIZE_K"]))

    _tensor_absmax_kernel[grid](
        x_ptr=x, absmax_bits_ptr=absmax_bits,
        M=M, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        **LAUNCH_OPTIONS,
    )
    _quantize_tensorwise_kernel[grid](
        x_ptr=x, absmax_bits_ptr=absmax_bits, q_ptr=q, absmax_ptr=absmax,
        M=M, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        TRANSPOSE=bool(transpose),
        **LAUNCH_OPTIONS,
    )
    return q, absmax
