"""fp8-blockwise on Hopper's fp8 tensor cores: torch.nn.functional.scaled_mm with 1x128 / 128x128 scales.

The values and scales are lowbit's own (lowbit.mx.ops' rule: e4m3, scale = amax / 448 per 1x128 tile
of x and g and per 128x128 block of the weight); only the GEMM moves to the tensor cores. Layouts, as
torch's scaled_mm OpInfo samples give them for compute capability 9.x (CUDA >= 12.9):

    A (M, K) e4m3 row-major,      scale_a (M, K/128) fp32, M-major (BlockWise1x128)
    B (K, N) e4m3 column-major,   scale_b (ceil4(K/128), N/128) fp32, the transpose of a contiguous
                                  (N/128, ceil4(K/128)) tensor (BlockWise128x128)

No GPU has run this path yet. So before the first call for each GEMM shape on each device, the
kernel and the simulation run on probe operands built to expose a misread scale (every tile and
block scaled differently, a NaN tile): NaN elsewhere, SQNR below CHECK_SQNR_DB or a refused call,
and lowbit warns and keeps the simulation for that shape. The bias is added in fp32 to the bf16
product and rounded again (the simulation rounds once).
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
    if 0 in (a.shape[0], k, n):  # 0 passes the tests below, and the probe has nothing to compare
        return f"an empty GEMM ({a.shape[0]}, {k}) @ ({k}, {n})"
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
    from lowbit.mx.ops import _blocks, fp32_scale, round_element

    r, k = x.shape
    rows = TILE if weight else 1
    xb = _blocks(x.float(), rows, TILE)  # no padding: the sizes are multiples of the blocks
    scale = fp32_scale(xb.abs().amax(dim=(1, 3), keepdim=True), E4M3_MAX)
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


def probe_operands(m_class: int, k: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Operands that expose a misread scale: every 1x128 tile of a and every 128x128 block of b_t
    scaled by its own power of two (within 2**+-3, so that every block weighs in the output), one NaN
    tile, a bias; M of the caller's alignment (M mod 128). Fresh layer weights would not do: their
    blocks all have about the same amax, so a kernel that reads the wrong block's scale looks right."""
    gen = torch.Generator().manual_seed(1234)
    m = TILE + (m_class % TILE)
    tiles = torch.exp2(torch.randint(-2, 3, (m, k // TILE), generator=gen).float())
    # neighbouring blocks never share a scale: exponents cycle through -3..3 along both axes
    rows, cols = torch.arange(n // TILE)[:, None], torch.arange(k // TILE)[None, :]
    blocks = torch.exp2(((2 * rows + 3 * cols) % 7 - 3).float())
    a = torch.randn(m, k, generator=gen) * tiles.repeat_interleave(TILE, 1)
    b_t = torch.randn(n, k, generator=gen) * blocks.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)
    a[1, :TILE] = float("nan")  # its output row must be NaN, and no other
    bias = torch.randn(n, generator=gen)
    return (a.to(device, torch.bfloat16), b_t.to(device, torch.bfloat16), bias.to(device, torch.bfloat16))


def _disagreement(expected: torch.Tensor, got: torch.Tensor) -> str | None:
    """None if got is expected up to the tensor cores' summation order and bf16 rounding, in every
    128-column slice of the output (each reads its own row of weight blocks)."""
    if not torch.equal(expected.isnan(), got.isnan()):
        return "NaN in other places than the simulation's"
    finite = ~expected.isnan().any(dim=1)
    worst = min(
        _sqnr_db(expected[finite, j : j + TILE].float(), got[finite, j : j + TILE].float())
        for j in range(0, expected.shape[1], TILE)
    )
    return None if worst >= CHECK_SQNR_DB else f"SQNR {worst:.1f} dB against it in a 128-column slice"


def checked_fp8_blockwise_mm(a, b_t, *, bias, simulate, scaled_mm=None) -> torch.Tensor:
    """The real GEMM where, for this shape, it agreed with `simulate(a, b_t, bias)` on probe_operands;
    else the simulation (and a warning, once per shape)."""
    # M enters only through its alignment (the kernels tile M); K and N fully.
    key = (str(a.device), math.gcd(a.shape[0], TILE), a.shape[1], b_t.shape[0])
    if key not in _VERDICTS:
        pa, pb, pbias = probe_operands(key[1], key[2], key[3], a.device)
        try:
            reason = _disagreement(simulate(pa, pb, pbias), fp8_blockwise_scaled_mm(pa, pb, bias=pbias,
                                                                                    scaled_mm=scaled_mm))
        except RuntimeError as err:  # the kernel refused these operands
            reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        _VERDICTS[key] = True if reason is None else reason
        if reason is not None:
            warnings.warn(
                f"lowbit fp8-blockwise: the tensor-core GEMM for (M, {a.shape[1]}) @ ({b_t.shape[1]}, "
                f"{b_t.shape[0]}) on {a.device} disagreed with the simulation on its first-use probe "
                f"({reason}); this shape keeps the simulation. Please report it.",
                stacklevel=4,
            )
    if _VERDICTS[key] is True:
        return fp8_blockwise_scaled_mm(a, b_t, bias=bias, scaled_mm=scaled_mm)
    return simulate(a, b_t, bias)
