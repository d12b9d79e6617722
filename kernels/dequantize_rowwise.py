"""Row-wise int8 dequantize: x_hat[m, k] = q[m, k] * (absmax[m] / 127), one pass, in the output dtype.

Mem-efficient SwitchBack saves only the int8 input for backward; its weight gradient needs x back in
16-bit. In eager torch that is three kernels with fp32 temporaries (19 bytes per element); here one
kernel reads 1 byte and writes 2 (or 4), with the same fp32 arithmetic as the torch twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, LAUNCH_OPTIONS, _cast_rne

if INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_K": 64}, num_warps=4)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_SIZE_M": 8, "BLOCK_SIZE_K": 256}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_K": 256}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_K": 128}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_K": 128}, num_warps=8),
        triton.Config({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_K": 512}, num_warps=8),
    ]


@triton.autotune(configs=_CONFIGS, key=["M", "K"])
@triton.jit
def _dequantize_rowwise_kernel(
    q_ptr, absmax_ptr, out_ptr,
    M, K,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """out[m, k] = q[m, k] * (absmax[m] / 127) in fp32, rounded once to out's dtype; q and out (M, K) contiguous."""
    offs_m = (tl.program_id(0) * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    offs_k = (tl.program_id(1) * BLOCK_SIZE_K + tl.arange(0, BLOCK_SIZE_K)).to(tl.int64)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_k[None, :] < K)
    # div_rn: Triton's fp32 `/` is approximate on CUDA; torch's division is correctly rounded.
    scale = tl.math.div_rn(tl.load(absmax_ptr + offs_m, mask=mask_m, other=0.0), 127.0)
    q = tl.load(q_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0)
    out = q.to(tl.float32) * scale[:, None]
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], _cast_rne(out, out_ptr.dtype.element_ty), mask=mask)


def launch_dequantize_rowwise(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernel on inputs already checked (lowbit.int8.ops.dequantize_rowwise): q (M, K) int8, absmax (M,) fp32."""
    M, K = q.shape
    out = torch.empty((M, K), dtype=dtype, device=q.device)
    if M == 0 or K == 0:
        return out

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_SIZE_M"]), triton.cdiv(K, meta["BLOCK_SIZE_K"]))

    _dequantize_rowwise_kernel[grid](
        q_ptr=q.contiguous(), absmax_ptr=absmax.contiguous(), out_ptr=out, M=M, K=K, **LAUNCH_OPTIONS
    )
    return out
