"""int8 x int8 GEMM with an int32 accumulator and the dequantize (scales, bias) fused into its epilogue."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit._inputs import check_int8_matmul

from ._common import INTERPRET, LAUNCH_OPTIONS, _cast_rne, check_device


def _config(bm, bn, bk, stages, warps, group=8):
    return triton.Config(
        {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": group},
        num_stages=stages, num_warps=warps,
    )


# int8 MMA consumes K in steps of 32 (mma.m16n8k32 on Ampere, wgmma k32 on Hopper). Shared memory per
# stage is (BLOCK_SIZE_M + BLOCK_SIZE_N) * BLOCK_SIZE_K bytes. tests/kernels/test_compile_targets.py
# compiles every config for sm_80 and sm_90 and checks: no register spills, shared memory within the
# generation's per-block limit, int8 tensor-core instructions.
#
# Ampere: the int32 accumulator lives in registers (BLOCK_SIZE_M * BLOCK_SIZE_N / threads of them per
# thread), so tiles stay at 128 x 128 per 8 warps or 128 x 64 per 4 warps; 128 x 256 and 256 x 128
# tiles spilled 580-8200 bytes at 255 registers (8 warps) and 128 x 128 x 64 at 4 warps spilled 584.
_AMPERE_CONFIGS = [
    _config(128, 128, 128, 3, 8),
    _config(128, 128, 64, 4, 8),
    _config(128, 128, 64, 3, 8),
    _config(64, 256, 128, 3, 8),
    _config(128, 64, 128, 4, 4),
    _config(64, 128, 128, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 128, 4, 4),
    _config(32, 64, 128, 4, 4),
]
# Hopper: Triton 3.8 does not keep an int32-accumulating wgmma in flight across k-steps (each step ends
# in wgmma.wait_group 0; the same loop in fp16 or fp8 keeps one group pending): its pipeliner makes a
# wgmma "properly async" only for an fp32 accumulator (WGMMAPipeline.cpp, dotCanBeProperlyAsync), and
# no rewrite of this loop (acc +=, tl.range stages, two accumulators) changes that. So a block idles
# its tensor cores while it waits. Two levers: a second resident block per SM to fill the gap (<= 96 KiB
# shared memory and, at 4 warps, <= 255 registers), and BLOCK_SIZE_K 256 (8 wgmma k32 per wait).
_HOPPER_CONFIGS = [
    _config(128, 128, 128, 3, 4),  # 96 KiB, 2 blocks per SM
    _config(128, 128, 64, 4, 4),  # 64 KiB, 2 blocks per SM
    _config(64, 128, 128, 4, 4),  # 96 KiB, 2 blocks per SM
    _config(128, 64, 128, 4, 4),  # 96 KiB, 2 blocks per SM
    _config(128, 128, 256, 3, 8),  # 192 KiB, 1 block, half the waits per K
    _config(128, 256, 128, 3, 8),  # 144 KiB, 1 block: the largest tile, for the largest GEMMs
    _config(128, 128, 128, 3, 8),
    _config(64, 64, 128, 5, 4),
]
# One small config: the interpreter runs every program in Python, and no tuning is needed there.
_INTERPRETER_CONFIGS = [_config(32, 32, 32, 1, 4, group=2)]


def configs_for_capability(major: int) -> list[triton.Config]:
    """The configs written for a GPU generation (compute capability major 8: Ampere, >= 9: Hopper)."""
    return _HOPPER_CONFIGS if major >= 9 else _AMPERE_CONFIGS


def _prune_for_device(configs, named_args, **kwargs):
    """Tune only over the configs written for this GPU generation (decided at launch, not import)."""
    if INTERPRET:
        return configs
    # Launched with keyword arguments, so the operands arrive in kwargs rather than named_args.
    a = named_args.get("a_ptr", kwargs.get("a_ptr"))
    major, _ = torch.cuda.get_device_capability(a.device)
    wanted = configs_for_capability(major)
    # Iterate over `wanted`: a config listed for both generations would otherwise be tuned twice.
    return [c for c in wanted if c in configs] or configs


@triton.autotune(
    configs=_INTERPRETER_CONFIGS if INTERPRET else _AMPERE_CONFIGS + _HOPPER_CONFIGS,
    key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_for_device},
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_SIZE_K"] == 0})
@triton.jit
def _int8_matmul_dequant_kernel(
    a_ptr, b_ptr, a_absmax_ptr, b_absmax_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_a_absmax, stride_b_absmax, stride_bias,
    stride_om, stride_on,
    COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """out[m, n] = sum_k a[m, k] b[k, n] (int32) * (a_absmax[m] * (b_absmax[n or ()] / 127**2)) + bias[n]."""
    # Walk the output tiles in bands of GROUP_SIZE_M tile-rows, column by column inside a band, so
    # programs running together share their B tiles (and A tiles) in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_SIZE_M)
    tiles_n = tl.cdiv(N, BLOCK_SIZE_N)
    tiles_per_band = GROUP_SIZE_M * tiles_n
    band = pid // tiles_per_band
    band_start = band * GROUP_SIZE_M
    band_rows = tl.minimum(tiles_m - band_start, GROUP_SIZE_M)
    in_band = pid - band * tiles_per_band
    pid_m = band_start + in_band % band_rows
    pid_n = in_band // band_rows

    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    # Rows/columns past the edge wrap onto valid ones instead of being masked: the loads stay
    # unconditional in the hot loop, and the store below drops the duplicates.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_SIZE_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            # Zero padding past K adds nothing to the int32 sum.
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0)
        # out_dtype: triton <= 3.6 defaults it to fp32 even with an int32 acc (3.8 takes acc's dtype).
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # int8 x int8 -> exact int32 (K <= MAX_INNER_DIM)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk

    # Dequantize in fp32 in the torch twin's order: acc * (a_s * (b_s * (1 / 127**2))) + bias.
    a_scale = tl.load(a_absmax_ptr + rows * stride_a_absmax).to(tl.float32)
    if COL_SCALE:
        b_scale = tl.load(b_absmax_ptr + cols * stride_b_absmax).to(tl.float32) * (1.0 / 16129.0)
        scale = a_scale[:, None] * b_scale[None, :]
    else:
        b_scale = tl.load(b_absmax_ptr).to(tl.float32) * (1.0 / 16129.0)
        scale = (a_scale * b_scale)[:, None]
    out = acc.to(tl.float32) * scale
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + cols * stride_bias).to(tl.float32)[None, :]

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, _cast_rne(out, out_ptr.dtype.element_ty), mask=mask)


def int8_matmul_dequant(
    a: torch.Tensor,
    b: torch.Tensor,
    a_absmax: torch.Tensor,
    b_absmax: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """out = (a @ b) * (a_absmax[:, None] * b_absmax / 127**2) + bias: int8 (M, K) @ (K, N), any strides,
    int32 accumulate, fp32 epilogue -> (M, N) contiguous in out_dtype.

    Args:
        a: (M, K) int8, any strides.
        b: (K, N) int8, any strides (pass `w_int8.t()` for x @ w.T; K-major B is what Hopper wants).
        a_absmax: (M,) row scales of `a` (fp32; any float dtype is read as fp32).
        b_absmax: () tensor scale or (N,) column scales of `b`.
        bias: optional (N,) float bias, added in fp32.
        out_dtype: float32, float16 or bfloat16; the fp32 result is rounded to it once.

    Returns:
        (M, N) tensor of `out_dtype`.
    """
    check_int8_matmul(a, b, a_absmax, b_absmax, bias, out_dtype, "int8_matmul_dequant")
    check_device(a, "int8_matmul_dequant")
    return launch_int8_matmul_dequant(a, b, a_absmax, b_absmax, bias=bias, out_dtype=out_dtype)


def launch_int8_matmul_dequant(
    a: torch.Tensor,
    b: torch.Tensor,
    a_absmax: torch.Tensor,
    b_absmax: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The kernel on operands already checked (lowbit._inputs.check_int8_matmul, a Triton device)."""
    M, K = a.shape
    N = b.shape[1]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out

    # K == 0 still launches: the loop runs zero times and the epilogue writes 0 * scale + bias,
    # exactly what the torch twin gives (NaN where a scale is NaN).
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_SIZE_M"]) * triton.cdiv(N, meta["BLOCK_SIZE_N"]),)

    col_scale = b_absmax.dim() == 1
    _int8_matmul_dequant_kernel[grid](
        a_ptr=a, b_ptr=b, a_absmax_ptr=a_absmax, b_absmax_ptr=b_absmax, bias_ptr=bias, out_ptr=out,
        M=M, N=N, K=K,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=b.stride(0), stride_bn=b.stride(1),
        stride_a_absmax=a_absmax.stride(0),
        stride_b_absmax=b_absmax.stride(0) if col_scale else 0,
        stride_bias=bias.stride(0) if bias is not None else 0,
        stride_om=out.stride(0), stride_on=out.stride(1),
        COL_SCALE=col_scale, HAS_BIAS=bias is not None,
        **LAUNCH_OPTIONS,
    )
    return out
