"""Row-wise absmax int8 quantization: one scale per row, q row-major like x."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    LAUNCH_OPTIONS,
    _boost,
    _nan_to_inf_abs,
    _quantize,
    _scale_inverse,
    _scale_out,
    check_float_matrix,
)

# A program owns BLOCK_SIZE_M whole rows and walks them in BLOCK_SIZE_K chunks. Rows up to
# BLOCK_SIZE_K long stay in registers (ONE_TILE); longer ones are read twice, the second time from L2.
if INTERPRET:
    # numpy runs each program in Python: few, large programs keep CI fast; K > 64 still takes the loop.
    _CONFIGS = [triton.Config({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_K": 64}, num_warps=4)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_SIZE_M": 1, "BLOCK_SIZE_K": 1024}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 1, "BLOCK_SIZE_K": 2048}, num_warps=8),
        triton.Config({"BLOCK_SIZE_M": 1, "BLOCK_SIZE_K": 4096}, num_warps=8),
        triton.Config({"BLOCK_SIZE_M": 1, "BLOCK_SIZE_K": 8192}, num_warps=16),
        triton.Config({"BLOCK_SIZE_M": 2, "BLOCK_SIZE_K": 2048}, num_warps=8),
        triton.Config({"BLOCK_SIZE_M": 4, "BLOCK_SIZE_K": 1024}, num_warps=8),
        triton.Config({"BLOCK_SIZE_M": 8, "BLOCK_SIZE_K": 512}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_K": 256}, num_warps=4),
    ]


@triton.autotune(configs=_CONFIGS, key=["M", "K"])
@triton.heuristics({"ONE_TILE": lambda args: args["K"] <= args["BLOCK_SIZE_K"]})
@triton.jit
def _quantize_rowwise_kernel(
    x_ptr, q_ptr, absmax_ptr,
    M, K,
    stride_xm, stride_xk,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """absmax[m] = max_k |x[m, k]|; q[m, k] = clamp(rint(x[m, k] * 127 / absmax[m])), q (M, K) contiguous."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    mask_m = offs_m < M
    # int64 row offsets: M * K may pass 2**31 elements.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * K
    offs_k = tl.arange(0, BLOCK_SIZE_K).to(tl.int64)  # x strided along K (a transposed g) may pass 2**31

    if ONE_TILE:
        mask = mask_m[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        absmax = tl.max(_nan_to_inf_abs(x), axis=1)
        q = _quantize(x, _scale_inverse(absmax)[:, None], _boost(absmax)[:, None])
        tl.store(q_rows + offs_k[None, :], q, mask=mask)
    else:
        absmax = tl.zeros((BLOCK_SIZE_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_SIZE_K):
            cols = k0 + offs_k
            mask = mask_m[:, None] & (cols[None, :] < K)
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0)
            absmax = tl.maximum(absmax, tl.max(_nan_to_inf_abs(x), axis=1))
        inv, boost = _scale_inverse(absmax)[:, None], _boost(absmax)[:, None]
        for k0 in range(0, K, BLOCK_SIZE_K):
            cols = k0 + offs_k
            mask = mask_m[:, None] & (cols[None, :] < K)
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0)
            tl.store(q_rows + cols[None, :], _quantize(x, inv, boost), mask=mask)
    tl.store(absmax_ptr + offs_m, _scale_out(absmax), mask=mask_m)


def launch_quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on an x already checked (a 2-D float tensor on a device Triton runs on)."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    if M == 0 or K == 0:  # nothing to read: an empty row has absmax 0, like the torch twin
        return q, torch.zeros((M,), dtype=torch.float32, device=x.device)
    absmax = torch.empty((M,), dtype=torch.float32, device=x.device)  # every row's program writes its own

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_SIZE_M"]),)

    _quantize_rowwise_kernel[grid](
        x_ptr=x, q_ptr=q, absmax_ptr=absmax,
        M=M, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        **LAUNCH_OPTIONS,
    )
    return q, absmax


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8: x (M, K) float, any strides -> q (M, K) int8 contiguous, absmax (M,) fp32.

    Args:
        x: (M, K) float32, float16 or bfloat16 tensor.

    Returns:
        q with q[m, k] = clamp(rint(x[m, k] * 127 / absmax[m]), -127, 127), and absmax, the fp32 max of
        |x[m, :]| (0 for an all-zero row, NaN for a row holding inf or NaN, whose q row is 0).
    """
    check_float_matrix(x, "quantize_rowwise")
    return launch_quantize_rowwise(x)
