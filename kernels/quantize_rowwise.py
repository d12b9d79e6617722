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
#
# With COLUMN_SUMS (grad_bias = sum of g over rows, folded into g's quantization so g is read once),
# a program owns ROWS_PER_PROGRAM rows (blocks of BLOCK_SIZE_M in turn) and writes its column
# sums to its own row of a (programs, K) fp32 buffer; a tiny reduce over programs finishes them.
# No atomics: the sum's order is fixed by the shape and the config, so reruns are bit-identical.
if INTERPRET:
    # numpy runs each program in Python: few, large programs keep CI fast; K > 64 still takes the loop.
    _CONFIGS = [triton.Config({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_K": 64}, num_warps=4)]
    _SUM_CONFIGS = _CONFIGS
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
    # Several rows per block, so the partial sums are added in registers before they touch memory.
    _SUM_CONFIGS = [
        triton.Config({"BLOCK_SIZE_M": 8, "BLOCK_SIZE_K": 512}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 8, "BLOCK_SIZE_K": 1024}, num_warps=8),
        triton.Config({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_K": 256}, num_warps=4),
        triton.Config({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_K": 512}, num_warps=4),  # at 8 warps: a 4-byte spill
        triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_K": 256}, num_warps=8),
    ]
# Rows per program of the COLUMN_SUMS variant: a power of two, a multiple of every BLOCK_SIZE_M above,
# sized so about SUM_PROGRAMS programs run (the partial-sum buffer is SUM_PROGRAMS x K fp32).
_MIN_ROWS_PER_PROGRAM = 32
SUM_PROGRAMS = 512


def rows_per_program(m: int) -> int:
    return max(_MIN_ROWS_PER_PROGRAM, triton.next_power_of_2(triton.cdiv(m, SUM_PROGRAMS)))


@triton.jit
def _quantize_rowwise_body(
    x_ptr, q_ptr, absmax_ptr, colsum_ptr,
    M, K,
    stride_xm, stride_xk,
    ROWS_PER_PROGRAM, COLUMN_SUMS: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """absmax[m] = max_k |x[m, k]|; q[m, k] = clamp(rint(x[m, k] * 127 / absmax[m])), q (M, K) contiguous;
    with COLUMN_SUMS, colsum[pid, k] = sum of x[m, k] over this program's rows, in fp32."""
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_SIZE_K).to(tl.int64)  # x strided along K (a transposed g) may pass 2**31
    colsum_row = colsum_ptr + pid.to(tl.int64) * K
    col_acc = tl.zeros((BLOCK_SIZE_K,), dtype=tl.float32)  # ONE_TILE's sums, kept in registers
    rows = tl.maximum(ROWS_PER_PROGRAM, BLOCK_SIZE_M)  # without COLUMN_SUMS: one block of rows
    for step in range(0, rows // BLOCK_SIZE_M):
        offs_m = pid * rows + step * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
        mask_m = offs_m < M
        # int64 row offsets: M * K may pass 2**31 elements.
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * K
        if ONE_TILE:
            mask = mask_m[:, None] & (offs_k[None, :] < K)
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
            absmax = tl.max(_nan_to_inf_abs(x), axis=1)
            q = _quantize(x, _scale_inverse(absmax)[:, None], _boost(absmax)[:, None])
            tl.store(q_rows + offs_k[None, :], q, mask=mask)
            if COLUMN_SUMS:
                col_acc += tl.sum(x.to(tl.float32), axis=0)
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
                if COLUMN_SUMS:  # this program's own row of the buffer: no other program touches it
                    mask_k = cols < K
                    previous = tl.load(colsum_row + cols, mask=mask_k & (step > 0), other=0.0)
                    tl.store(colsum_row + cols, previous + tl.sum(x.to(tl.float32), axis=0), mask=mask_k)
            if COLUMN_SUMS:
                # The next block of rows reads these sums back, maybe from other threads of the
                # program: make the stores visible to them first.
                tl.debug_barrier()
        tl.store(absmax_ptr + offs_m, _scale_out(absmax), mask=mask_m)
    if COLUMN_SUMS:
        if ONE_TILE:
            tl.store(colsum_row + offs_k, col_acc, mask=offs_k < K)


def _one_tile(args):
    return args["K"] <= args["BLOCK_SIZE_K"]


_quantize_rowwise_kernel = triton.autotune(configs=_CONFIGS, key=["M", "K"])(
    triton.heuristics({"ONE_TILE": _one_tile})(_quantize_rowwise_body)
)
_quantize_rowwise_column_sums_kernel = triton.autotune(configs=_SUM_CONFIGS, key=["M", "K"])(
    triton.heuristics({"ONE_TILE": _one_tile})(_quantize_rowwise_body)
)


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
        x_ptr=x, q_ptr=q, absmax_ptr=absmax, colsum_ptr=absmax,  # colsum_ptr unused without COLUMN_SUMS
        M=M, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        ROWS_PER_PROGRAM=1, COLUMN_SUMS=False,
        **LAUNCH_OPTIONS,
    )
    return q, absmax


def launch_quantize_rowwise_column_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_rowwise plus x's column sums (K,) fp32 from the same read of x; x already checked."""
    M, K = x.shape
    if M == 0 or K == 0:
        q, absmax = launch_quantize_rowwise(x)
        return q, absmax, torch.zeros((K,), dtype=torch.float32, device=x.device)
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    absmax = torch.empty((M,), dtype=torch.float32, device=x.device)
    rows = rows_per_program(M)
    programs = triton.cdiv(M, rows)
    partial = torch.empty((programs, K), dtype=torch.float32, device=x.device)  # every entry written
    _quantize_rowwise_column_sums_kernel[(programs,)](
        x_ptr=x, q_ptr=q, absmax_ptr=absmax, colsum_ptr=partial,
        M=M, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        ROWS_PER_PROGRAM=rows, COLUMN_SUMS=True,
        **LAUNCH_OPTIONS,
    )
    return q, absmax, partial.sum(dim=0)


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


def quantize_rowwise_column_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_rowwise(x) and x.sum(dim=0) in fp32, from one read of x (SwitchBack's grad_bias).

    Returns:
        q and absmax as quantize_rowwise, and (K,) fp32 column sums, added in fp32 in a fixed order
        (per program, then over programs): torch's sum may round differently in the last bits.
    """
    check_float_matrix(x, "quantize_rowwise_column_sums")
    return launch_quantize_rowwise_column_sums(x)
