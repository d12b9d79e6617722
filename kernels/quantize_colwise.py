"""Column-wise absmax int8 quantization, stored transposed: one scale per column of x, q = (K, M)."""

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

# Pass 1 reduces (BLOCK_SIZE_M, BLOCK_SIZE_K) tiles over M and merges them with one atomic per column;
# pass 2 quantizes the same tiles and stores them transposed. Both read x along its contiguous dim and
# the tiled grid fills the GPU whatever the aspect ratio (bitsandbytes' one-program-per-column kernel
# did neither).
if INTERPRET:
    # Big tiles: numpy runs each program in Python; tests still span several tiles each way.
    _ABSMAX_CONFIGS = [triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_K": 64}, num_warps=4)]
    _QUANTIZE_CONFIGS = [triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_K": 64}, num_warps=4)]
else:
    _ABSMAX_CONFIGS = [
        triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_K": 128}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_K": 128}, num_warps=8),
        triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_K": 64}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 256, "BLOCK_SIZE_K": 64}, num_warps=8),
        # 256 x 128 at 8 warps spilled 4 bytes on sm_90 (tests/kernels/test_compile_targets.py)
        triton.Config({"BLOCK_SIZE_M": 256, "BLOCK_SIZE_K": 128}, num_warps=16),
    ]
    _QUANTIZE_CONFIGS = [
        triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_K": 64}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_K": 128}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_K": 64}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_K": 128}, num_warps=8),
    ]


@triton.autotune(configs=_ABSMAX_CONFIGS, key=["M", "K"])
@triton.jit
def _colwise_absmax_kernel(
    x_ptr, absmax_bits_ptr,
    M, K,
    stride_xm, stride_xk,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """absmax_bits[k] = max over row tiles of max_m |x[m, k]| (NaN as inf), as int32 bits of fp32."""
    x, _, offs_k, _ = _load_tile(x_ptr, M, K, stride_xm, stride_xk, BLOCK_SIZE_M, BLOCK_SIZE_K)
    mask_k = offs_k < K
    col_max = tl.max(_nan_to_inf_abs(x), axis=0)
    # Non-negative floats order like their int32 bits; max is idempotent under autotuning's re-runs.
    tl.atomic_max(absmax_bits_ptr + offs_k, col_max.to(tl.int32, bitcast=True), mask=mask_k)


@triton.autotune(configs=_QUANTIZE_CONFIGS, key=["M", "K"])
@triton.jit
def _quantize_colwise_transposed_kernel(
    x_ptr, absmax_bits_ptr, q_ptr, absmax_ptr,
    M, K,
    stride_xm, stride_xk,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """q[k, m] = clamp(rint(x[m, k] * 127 / absmax[k])), q (K, M) row-major; absmax (K,) fp32."""
    x, offs_m, offs_k, mask = _load_tile(x_ptr, M, K, stride_xm, stride_xk, BLOCK_SIZE_M, BLOCK_SIZE_K)
    mask_k = offs_k < K
    absmax = tl.load(absmax_bits_ptr + offs_k, mask=mask_k, other=0).to(tl.float32, bitcast=True)
    q = _quantize(x, _scale_inverse(absmax)[None, :], _boost(absmax)[None, :])
    # Transposed store, contiguous along m; Triton reshuffles the tile through shared memory.
    tl.store(q_ptr + offs_k[None, :] * M + offs_m[:, None], q, mask=mask)
    if tl.program_id(0) == 0:
        tl.store(absmax_ptr + offs_k, _scale_out(absmax), mask=mask_k)


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
    M, K = x.shape
    q = torch.empty((K, M), dtype=torch.int8, device=x.device)
    absmax = torch.zeros((K,), dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:  # an empty column has absmax 0, like the torch twin
        return q, absmax
    absmax_bits = torch.zeros((K,), dtype=torch.int32, device=x.device)  # +0.0; |x| >= 0

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_SIZE_M"]), triton.cdiv(K, meta["BLOCK_SIZE_K"]))

    _colwise_absmax_kernel[grid](
        x_ptr=x, absmax_bits_ptr=absmax_bits,
        M=M, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        **LAUNCH_OPTIONS,
    )
    _quantize_colwise_transposed_kernel[grid](
        x_ptr=x, absmax_bits_ptr=absmax_bits, q_ptr=q, absmax_ptr=absmax,
        M=M, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        **LAUNCH_OPTIONS,
    )
    return q, absmax
