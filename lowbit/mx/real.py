"""fp8-blockwise on Hopper's fp8 tensor cores: torch.nn.functional.scaled_mm with 1x128 / 128x128 scales.

The values and scales are lowbit's own (lowbit.mx.ops' rule: e4m3, scale = amax / 448 per 1x128 tile
of x and g and per 128x128 block of the weight); only the GEMM moves to the tensor cores. Layouts, as
torch's scaled_mm OpInfo samples give them for compute capability 9.x (CUDA >= 12.9):

    A (M, K) e4m3 row-major,      scale_a (M, K/128) fp32, M-major (BlockWise1x128)
    B (K, N) e4m3 column-major,   scale_b (ceil4(K/128), N/128) fp32, the transpose of a contiguous
                                  (N/128, ceil4(K/128)) tensor (BlockWise128x128)

No GPU has run this path yet. So the first call for each GEMM shape on each device is also computed
by the simulation and compared: below CHECK_SQNR_DB, or if the kernel refuses the call, lowbit warns
and keeps the simulation for that shape. Nothing is returned that was not checked once.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "CHECK_SQNR_DB", "checked_fp8_blockwise_mm", "fp8_blockwise_parts", "fp8_blockwise_scaled_mm",
    "real_fp8_blockwise_reason",
]

TILE = 128
# The simulation and the tensor cores differ by fp32 summation order and the bf16 output: > 40 dB.
CHECK_SQNR_DB = 30.0
E4M3_MAX = 448.0


def real_fp8_blockwise_reason(a: torch.Tensor, b_t: torch.Tensor, out_dtype: torch.dtype, b_is_weight: bool,
                              capability: tuple[int, int]) -> str | None:
    """None if the real kernel takes this GEMM (a (M, K) @ b_t (N, K).T), else why not."""
    if capability[0] != 9:
        return f"compute capability {capability[0]}.{capability[1]} (the 1x128 / 128x128 kernels are Hopper's)"
    if getattr(F, "scaled_mm", None) is None or not hasattr(F, "ScalingType"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm"
    cuda = torch.version.cuda
    if cuda is None or tuple(int(v) for v in cuda.split(".")[:2]) < (12, 9):
        return f"CUDA {cuda}: blockwise scaling needs cuBLASLt from CUDA 12.9"
    k, n = a.shape[1], b_t.shape[0]
    if k % TILE or (b_is_weight and n % TILE):
        return f"inner dimension {k} and output dimension {n} must be multiples of {TILE}"
    if out_dtype != torch.bfloat16:
        return f"{out_dtype} output (the kernel writes bfloat16)"
    if not b_is_weight:
        return "the weight gradient (both operands 1x128) has no tested layout yet"
    return None


def fp8_blockwise_parts(x: torch.Tensor, *, weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, K), K a multiple of 128 (and R, for a weight) -> (q (R, K) float8_e4m3fn, scales fp32):
    (R, K/128) per 1x128 tile, or (R/128, K/128) per 128x128 block. lowbit.mx.ops' rule exactly."""
    from lowbit.mx.ops import AMAX_FLOOR, round_element

    r, k = x.shape
    rows = TILE if weight else 1
    xb = x.float().reshape(r // rows, rows, k // TILE, TILE)
    amax = xb.abs().amax(dim=(1, 3), keepdim=True)
    scale = torch.where(amax > 0, amax.clamp(min=AMAX_FLOOR) / E4M3_MAX, 1.0)
    scale = torch.where(torch.isfinite(amax), scale, torch.nan)
    q = round_element(xb / scale, "e4m3")  # exact e4m3 values: the cast below is exact
    return q.reshape(r, k).to(torch.float8_e4m3fn), scale.reshape(r // rows, k // TILE)


def fp8_blockwise_scaled_mm(a: torch.Tensor, b_t: torch.Tensor, *, bias: torch.Tensor | None = None,
                            scaled_mm=None) -> torch.Tensor:
    """fp8-blockwise(a) @ fp8-blockwise(b_t).T (+ bias, in fp32) on the tensor cores, bfloat16 out.

    a (M, K) activations or gradients, 1x128 tiles; b_t (N, K) the weight side, 128x128 blocks.
    """
    scaled_mm = scaled_mm or F.scaled_mm
    qa, sa = fp8_blockwise_parts(a, weight=False)
    qb, sb = fp8_blockwise_parts(b_t, weight=True)
    k_tiles = a.shape[1] // TILE
    padded = 4 * math.ceil(k_tiles / 4)
    scale_b = F.pad(sb, (0, padded - k_tiles)).contiguous().t()  # (ceil4(K/128), N/128)
    out = scaled_mm(
        qa, qb.t(),  # B (K, N) column-major
        [sa.t().contiguous().t()], [F.ScalingType.BlockWise1x128],
        [scale_b], [F.ScalingType.BlockWise128x128],
        swizzle_a=[F.SwizzleType.NO_SWIZZLE], swizzle_b=[F.SwizzleType.NO_SWIZZLE],
        output_dtype=torch.bfloat16,
    )
    if bias is not None:
        out = (out.float() + bias.float()).to(torch.bfloat16)
    return out


def _sqnr_db(reference: torch.Tensor, x: torch.Tensor) -> float:
    reference, x = reference.double(), x.double()
    noise = (x - reference).square().sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(reference.square().sum() / noise))


# The first-use check's outcome per GEMM shape and device: True (the kernel agreed) or why not.
# A function of the key alone (the kernel's arithmetic for that shape), so it cannot go stale.
_VERDICTS: dict[tuple, bool | str] = {}


def checked_fp8_blockwise_mm(a, b_t, *, bias, simulate, scaled_mm=None) -> torch.Tensor:
    """The real GEMM where its first use on this shape agreed with `simulate()`, else the simulation."""
    # M enters the check only through its alignment (the kernels tile M); K and N fully.
    key = (str(a.device), math.gcd(a.shape[0], 128), a.shape[1], b_t.shape[0])
    verdict = _VERDICTS.get(key)
    if verdict is True:
        return fp8_blockwise_scaled_mm(a, b_t, bias=bias, scaled_mm=scaled_mm)
    expected = simulate()
    if verdict is not None or not torch.isfinite(expected).all():
        return expected  # refused before (warned then), or no finite reference to check against yet
    try:
        got = fp8_blockwise_scaled_mm(a, b_t, bias=bias, scaled_mm=scaled_mm)
        sqnr = _sqnr_db(expected.float(), got.float())
        reason = None if sqnr >= CHECK_SQNR_DB else f"SQNR {sqnr:.1f} dB against it"
    except RuntimeError as err:  # the kernel refused these operands
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    _VERDICTS[key] = True if reason is None else reason
    if reason is None:
        return got
    warnings.warn(
        f"lowbit fp8-blockwise: the tensor-core GEMM for ({a.shape[0]}, {a.shape[1]}) @ "
        f"({b_t.shape[1]}, {b_t.shape[0]}) on {a.device} disagreed with the simulation on first use "
        f"({reason}); this shape keeps the simulation. Please report it.",
        stacklevel=4,
    )
    return expected
