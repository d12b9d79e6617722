"""The block-scaled numerics in plain torch: casts to MX / NVFP4 / fp8-blockwise and their GEMM.

Every operand of a GEMM is split into blocks along the GEMM's reduction dimension (the last dim
of both operands here: out (M, N) = a (M, K) @ b_t (N, K).T), one scale per block:

  mxfp8, mxfp8-e5m2, mxfp4 (OCP MX): blocks of 32, an E8M0 (power-of-two) scale
      scale = 2**clamp(floor(log2(amax)) - emax_elem, -127, 127)   emax_elem: e4m3 8, e5m2 15, e2m1 2
      q     = E(x / scale)                                          exact division by a power of two
  nvfp4: blocks of 16, e2m1 elements, a two-level scale
      s_t   = amax_tensor / (448 * 6)                               fp32, one per tensor
      s_b   = e4m3((amax / 6) / s_t)                                the block scale, stored in e4m3
      q     = e2m1(x / (s_b * s_t))                                 fp32; s_b == 0 -> q = 0
  fp8-blockwise: e4m3 elements, scale = amax / 448 (fp32) per 1x128 tile of x and g, per 128x128
      block of the weight (the same blocks for w and w.T, so forward and grad-input share them)
      q     = e4m3(x / scale)

E(.) rounds to the nearest element value, ties to even, saturating at the largest finite value
(e4m3 448, e5m2 57344, e2m1 6: values 0, 0.5, 1, 1.5, 2, 3, 4, 6). amax is over the block's real
elements: an inner dimension that is not a multiple of the block is padded with zeros (which
change no amax and add nothing to a sum), and sliced off again. An all-zero block stays zero. A
block holding inf or NaN dequantizes to NaN (E8M0's NaN scale), so it poisons the outputs that
read it; for nvfp4 the tensor scale is NaN then, and the whole tensor is. amax below AMAX_FLOOR
counts as AMAX_FLOOR for the fp32 scales (nvfp4's tensor scale, fp8-blockwise), keeping them normal.

The GEMM is simulated: the dequantized values q * scale are formed in fp32 and multiplied in fp32,
the nvfp4 tensor scales applied after. For MX and nvfp4's block part q * scale is exact in fp32 (a
few significant bits times a power of two, or times an e4m3 number), so the result is the
block-scaled tensor-core product up to the fp32 summation order; fp8-blockwise's fp32 scales cost
one more fp32 rounding (2**-24 relative) per element. fp8-blockwise runs on Hopper's tensor cores
where lowbit.mx.real takes the GEMM; the others are simulated everywhere (see `simulation_note`).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from lowbit._backend import get_backend
from lowbit._inputs import check_float_matrix
from lowbit.mx import real
from lowbit.mx.config import FORMATS, BlockFormat

__all__ = ["AMAX_FLOOR", "ELEMENTS", "block_mm", "note_simulated", "quantize", "round_element", "simulation_note"]

# element -> (mantissa bits, exponent of the smallest normal, largest finite value, emax_elem)
ELEMENTS = {
    "e4m3": (3, -6, 448.0, 8),
    "e5m2": (2, -14, 57344.0, 15),
    "e2m1": (1, 0, 6.0, 2),
}
AMAX_FLOOR = 1e-30


def round_element(y: torch.Tensor, element: str) -> torch.Tensor:
    """fp32 y -> the nearest `element` value (as fp32), ties to even, saturating; NaN stays NaN."""
    mbits, emin, fmax, _ = ELEMENTS[element]
    y = y.clamp(-fmax, fmax)
    _, exp = torch.frexp(y)  # |y| = m * 2**exp, m in [0.5, 1): the leading bit is 2**(exp - 1)
    # Subnormals share the smallest normal's spacing; y / step is exact, torch.round ties to even.
    step = torch.exp2(((exp - 1).clamp(min=emin) - mbits).float())
    return torch.round(y / step) * step


def _blocks(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """x (R, K) -> zero-padded to multiples of (rows, cols), viewed as (R'/rows, rows, K'/cols, cols)."""
    r, k = x.shape
    x = F.pad(x, (0, -k % cols, 0, -r % rows))
    return x.reshape(x.shape[0] // rows, rows, x.shape[1] // cols, cols)


def _e8m0_scale(amax: torch.Tensor, emax_elem: int) -> torch.Tensor:
    """2**(floor(log2(amax)) - emax_elem), clamped to E8M0's exponents; NaN for inf/NaN amax."""
    _, exp = torch.frexp(amax)  # floor(log2(amax)) = exp - 1, exact (0 for amax == 0: any scale will do)
    scale = torch.exp2((exp - 1 - emax_elem).clamp(-127, 127).float())
    return torch.where(torch.isfinite(amax), scale, torch.nan)


def fp32_scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """fp8-blockwise's block scale amax / fmax (amax floored at AMAX_FLOOR; 1 for an all-zero block,
    NaN for one holding inf or NaN). The simulation and lowbit.mx.real both take it from here."""
    scale = torch.where(amax > 0, amax.clamp(min=AMAX_FLOOR) / fmax, 1.0)
    return torch.where(torch.isfinite(amax), scale, torch.nan)


def quantize(x: torch.Tensor, fmt: str, *, weight: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, K) float -> (x_hat (R, K) fp32, tensor_scale () fp32), x ~ x_hat * tensor_scale.

    x_hat holds the dequantized block values (q * block scale); tensor_scale is nvfp4's s_t and 1
    for the other formats. Blocks run along the last dim; `weight` picks fp8-blockwise's 128x128
    weight blocks.
    """
    check_float_matrix(x, "quantize")
    spec: BlockFormat = FORMATS[fmt]
    r, k = x.shape
    one = torch.ones((), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return x.float(), one
    rows = spec.weight_rows if weight else 1
    xb = _blocks(x.float(), rows, spec.block)
    amax = xb.abs().amax(dim=(1, 3), keepdim=True)  # propagates NaN
    _, _, fmax, emax_elem = ELEMENTS[spec.element]
    tensor_scale = one
    if spec.scale == "e8m0":
        scale = _e8m0_scale(amax, emax_elem)
        q = round_element(xb / scale, spec.element)
    elif spec.scale == "fp32":
        scale = fp32_scale(amax, fmax)
        q = round_element(xb / scale, spec.element)
    else:  # nvfp4
        amax_t = amax.amax()
        tensor_scale = torch.where(amax_t > 0, amax_t.clamp(min=AMAX_FLOOR) / (448.0 * fmax), 1.0)
        tensor_scale = torch.where(torch.isfinite(amax_t), tensor_scale, torch.nan)
        scale = round_element((amax / fmax) / tensor_scale, "e4m3")  # <= 448: never saturates
        # A block scale that underflows e4m3 to 0 holds only values far below the tensor's amax: 0.
        step = scale * tensor_scale
        q = torch.where(scale > 0, round_element(xb / torch.where(scale > 0, step, 1.0), spec.element), 0.0)
        q = torch.where(torch.isfinite(amax_t), q, torch.nan)
    x_hat = (q * scale).reshape(xb.shape[0] * rows, -1)[:r, :k]
    return x_hat, tensor_scale


def block_mm(
    a: torch.Tensor,
    b_t: torch.Tensor,
    fmt: str,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    b_is_weight: bool = True,
) -> torch.Tensor:
    """out = fmt(a) @ fmt(b_t).T + bias for a (M, K), b_t (N, K), fp32 accumulate, cast once to out_dtype.

    Both operands are blocked along K. `b_is_weight` gives b_t fp8-blockwise's 128x128 weight
    blocks (False for the weight gradient, whose operands are both activations / gradients).
    fp8-blockwise runs on Hopper's fp8 tensor cores where lowbit.mx.real takes the GEMM (checked
    against this simulation on first use); everything else is simulated.
    """
    if b_t.shape[1] != a.shape[1]:
        raise ValueError(f"block_mm: cannot multiply {tuple(a.shape)} by {tuple(b_t.shape)}.T")

    def simulate(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        a_hat, a_scale = quantize(a, fmt)
        b_hat, b_scale = quantize(b_t, fmt, weight=b_is_weight)
        out = (a_hat @ b_hat.t()) * (a_scale * b_scale)
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)

    if fmt == "fp8-blockwise" and a.is_cuda and get_backend() != "torch" and torch.version.hip is None:
        capability = _cuda_capability(a.device.index if a.device.index is not None else torch.cuda.current_device())
        reason = real.real_fp8_blockwise_reason(a, b_t, out_dtype, b_is_weight, capability)
        if reason is None:
            return real.checked_fp8_blockwise_mm(a, b_t, bias=bias, simulate=simulate)
        if capability[0] == 9:  # the kernel exists here, just not for this GEMM: say so, once per reason
            note_simulated(f"lowbit fp8-blockwise: simulated on {a.device} for a GEMM the tensor cores' "
                           f"kernel does not take: {reason}")
    return simulate(a, b_t, bias)


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def simulation_note(fmt: str, device: torch.device) -> str | None:
    """Why `fmt` is simulated on `device` where a real kernel would be possible to ask for, else None.

    torch's scaled_mm has block-scaled kernels for MX / NVFP4 on compute capability >= 10.0
    (Blackwell), which lowbit has no path to yet. fp8-blockwise on 9.x (Hopper) runs on the tensor
    cores (lowbit.mx.real; block_mm notes the GEMMs it cannot take). None on other devices and under
    LOWBIT_BACKEND=torch (the plain-torch reference, asked for).
    """
    if device.type != "cuda" or get_backend() == "torch" or torch.version.hip is not None or fmt == "fp8-blockwise":
        return None
    capability = _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())
    if capability < (10, 0):
        return None
    return (
        f"lowbit {fmt}: simulated in plain torch (fp32 matmul of the dequantized blocks) on {device}, "
        f"compute capability {capability[0]}.{capability[1]}: torch's scaled_mm could run {fmt} here, but "
        "lowbit has no tested real-kernel path for it yet"
    )


@functools.cache
def note_simulated(message: str) -> None:
    """Warn once per message (cached): one note per format and device."""
    warnings.warn(message, stacklevel=4)
