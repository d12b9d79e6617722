"""a @ dequantize(q): a 16/32-bit GEMM whose second operand arrives as row-wise int8 and is
dequantized as it is loaded, never written back in 16-bit.

Mem-efficient SwitchBack keeps only int8 x for backward; its weight gradient g.T @ x needs x in the
input's dtype. Dequantizing x first writes and re-reads 2 bytes per element; here each (BLOCK_SIZE_K,
BLOCK_SIZE_N) tile of q is read as int8 and turned into

    x_hat[k, n] = dtype(q[k, n] * (absmax[k] / 127))      (fp32 product, one rounding: the torch twin's)

in registers, then multiplied with fp32 accumulation and rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, LAUNCH_OPTIONS, _cast_rne


def _config(bm, bn, bk, stages, warps):
    return triton.Config({"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk}, num_stages=stages,
                         num_warps=warps)


if INTERPRET:
    _CONFIGS = [_config(32, 32, 32, 1, 4)]
else:
    # 16-bit tensor-core tiles (HMMA / HGMMA); shared memory per stage (BM * BK) * 2 + BK * BN bytes.
    # 128 x 128 x 64 at 8 warps spilled 8 bytes on sm_80 (tests/kernels/test_compile_targets.py).
    _CONFIGS = [
        _config(128, 64, 64, 3, 8),
        _config(128, 128, 32, 3, 8),
        _config(64, 128, 64, 4, 4),
        _config(64, 128, 32, 4, 4),
        _config(128, 64, 32, 4, 4),
        _config(64, 64, 64, 4, 4),
    ]

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _mm_dequant_rows_kernel(
    a_ptr, q_ptr, absmax_ptr, out_ptr,
    M, N, K,
    stride_am, stride_ak, stride_qk, stride_qn,
    DTYPE: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """out (M, N) = a (M, K) @ x_hat (K, N), x_hat[k, n] = DTYPE(q[k, n] * (absmax[k] / 127))."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    rows = (offs_m % M).to(tl.int64)  # edge rows / columns wrap onto valid ones; the store masks them
    cols = (offs_n % N).to(tl.int64)
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_SIZE_K):
        ks = (k0 + offs_k).to(tl.int64)
        in_k = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=in_k[None, :], other=0.0)
        q = tl.load(q_ptr + ks[:, None] * stride_qk + cols[None, :] * stride_qn, mask=in_k[:, None], other=0)
        # div_rn: the torch twin's absmax / 127 is correctly rounded; then one rounding to DTYPE.
        scale = tl.math.div_rn(tl.load(absmax_ptr + ks, mask=in_k, other=0.0), 127.0)
        x_hat = _cast_rne(q.to(tl.float32) * scale[:, None], DTYPE)
        if IEEE or INTERPRETED:
            # fp32 operands: full fp32 products, as torch.mm without TF32. The interpreter's dot
            # mishandles 16-bit operands made in registers, so there the 16-bit values are multiplied
            # as fp32: exact products of 16-bit numbers, the same fp32 sums.
            acc = tl.dot(a.to(tl.float32), x_hat.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, x_hat, acc)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n.to(tl.int64)[None, :]
    tl.store(out_ptrs, _cast_rne(acc, DTYPE), mask=mask)


def launch_mm_dequant_rows(a: torch.Tensor, q: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """a (M, K) float32/bfloat16/float16, any strides, @ row-wise int8 q (K, N) with absmax (K,) fp32
    -> (M, N) contiguous in a's dtype. Inputs already checked (lowbit.int8.ops.mm_dequantized)."""
    M, K = a.shape
    N = q.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_SIZE_M"]), triton.cdiv(N, meta["BLOCK_SIZE_N"]))

    _mm_dequant_rows_kernel[grid](
        a_ptr=a, q_ptr=q, absmax_ptr=absmax.contiguous(), out_ptr=out,
        M=M, N=N, K=K,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_qk=q.stride(0), stride_qn=q.stride(1),
        DTYPE=_TL_DTYPES[a.dtype], IEEE=a.dtype == torch.float32, INTERPRETED=INTERPRET,
        **LAUNCH_OPTIONS,
    )
    return out
