"""int8 x int8 GEMM with an int32 accumulator and the dequantize (scales, bias) fused into its epilogue."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INTERPRET, LAUNCH_OPTIONS, MAX_INNER_DIM, _cast_rne, check_device


def _config(bm, bn, bk, stages, warps, group=8):
    return triton.Config(
        {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": group},
        num_stages=stages, num_warps=warps,
    )


# int8 MMA consumes K in steps of 32 (mma.m16n8k32 on Ampere, wgmma k32 on Hopper): BLOCK_SIZE_K of
# 64/128 keeps the tensor cores fed with 1-byte operands. Shared memory per stage is
# (BLOCK_SIZE_M + BLOCK_SIZE_N) * BLOCK_SIZE_K bytes (num_stages - 1 stages on Ampere, all on Hopper):
# every config fits A100's 164 KiB / H100's 228 KiB (checked by compiling for sm_80 / sm_90).
_AMPERE_CONFIGS = [
    _config(128, 256, 128, 3, 8),
    _config(256, 128, 128, 3, 8),
    _config(128, 256, 64, 3, 8),
    _config(256, 128, 64, 3, 8),
    _config(128, 128, 128, 3, 8),
    _config(128, 128, 64, 4, 4),
    _config(128, 64, 128, 4, 4),
    _config(64, 128, 128, 4, 4),
    _config(64, 64, 128, 4, 4),
    _config(32, 64, 128, 4, 4),
]
# Hopper's wgmma wants 128-row tiles per pair of warpgroups and deeper pipelines.
_HOPPER_CONFIGS = [
    _config(128, 256, 128, 3, 8),
    _config(256, 128, 128, 3, 8),
    _config(128, 256, 64, 4, 8),
    _config(128, 128, 128, 4, 8),
    _config(128, 128, 128, 4, 4),
    _config(128, 64, 128, 4, 4),
    _config(64, 128, 128, 4, 4),
    _config(64, 64, 128, 5, 4),
]
# One small config: the interpreter runs every program in Python, and no tuning is needed there.
_INTERPRETER_CONFIGS = [_config(32, 32, 32, 1, 4, group=2)]


def _prune_for_device(configs, named_args, **kwargs):
    """Tune only over the configs written for this GPU generation (decided at launch, not import)."""
    if INTERPRET:
        return configs
    # Launched with keyword arguments, so the operands arrive in kwargs rather than named_args.
    a = named_args.get("a_ptr", kwargs.get("a_ptr"))
    major, _ = torch.cuda.get_device_capability(a.device)
    wanted = _HOPPER_CONFIGS if major >= 9 else _AMPERE_CONFIGS
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
        acc = tl.dot(a, b, acc)  # int8 x int8 -> exact int32 (K <= MAX_INNER_DIM)
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
    op = "int8_matmul_dequant"
    for name, t in (("a", a), ("b", b), ("a_absmax", a_absmax), ("b_absmax", b_absmax), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"{op}: operands must be int8, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{op}: cannot multiply {tuple(a.shape)} by {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[1]
    if K > MAX_INNER_DIM:
        raise ValueError(f"{op}: inner dimension {K} > {MAX_INNER_DIM} could overflow the int32 accumulator")
    if a_absmax.shape != (M,) or b_absmax.shape not in ((), (N,)):
        raise ValueError(
            f"{op}: scales of shape {tuple(a_absmax.shape)} and {tuple(b_absmax.shape)} do not fit "
            f"a ({M}, {K}) @ ({K}, {N}) product: expected ({M},) and () or ({N},)"
        )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"{op}: bias of shape {tuple(bias.shape)}, expected ({N},)")
    scales = (a_absmax, b_absmax) + ((bias,) if bias is not None else ())
    for t in scales:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: scales and bias must be float32, float16 or bfloat16, got {t.dtype}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    devices = {t.device for t in (a, b) + scales}
    if len(devices) != 1:
        raise ValueError(f"{op}: tensors on different devices {sorted(str(d) for d in devices)}")
    check_device(a, op)

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
