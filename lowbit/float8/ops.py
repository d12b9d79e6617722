"""The float8 numerics: amax-scaled saturating casts and the fp8 matmul, simulated or on fp8 tensor cores.

The rules (F is the fp8 format: e4m3 for inputs and weights, max 448; e5m2 for gradients, max 57344):

  cast, per row or per tensor, amax a over the group:
      scale     = F.max / max(a, AMAX_FLOOR)                    fp32
      q         = F(clamp(x * scale, -F.max, F.max))            x * scale in fp32; saturating; ties to even
      scale_inv = 1 / scale                                     what the matmul multiplies back
      a == 0         -> scale = scale_inv = 1, q = 0            (all-zero rows stay zero, never NaN)
      a not finite   -> q = 0, scale_inv = NaN                  (a group holding inf/NaN poisons its own
                                                                 output row, or the whole output for a
                                                                 tensor scale, with NaN; nothing else)
  matmul, out (M, N) = a (M, K) @ b_t (N, K).T:
      acc = sum_k float(a_q[m, k]) * float(b_q[n, k])           products exact, fp32 accumulate
      out = acc * a_scale_inv[m] * b_scale_inv[n] + bias        in fp32, cast once to the output dtype

torch's cast to float8 does not saturate in general (e4m3fn has no inf: out-of-range values become NaN
on some devices and versions), hence the clamp. AMAX_FLOOR keeps the scale a finite, normal fp32
number; a group whose amax is below it (values under ~1e-30) keeps fewer significant bits.

Simulated (any device): the rule in plain torch, the fp8 values held as float32. Real: the same
through `torch._scaled_mm` on fp8 tensor cores (CUDA compute capability >= 8.9), which wants mat2
column-major, K and N multiples of 16 (padded here with zeros and sliced back), fp32 scales of shape
() (tensor-wise) or (M, 1) / (1, N) (row-wise), and, for row-wise scales, a bfloat16 output here
(older torch versions take nothing else). Real and simulated results differ by the fp32
accumulation order and, for row-wise scales, by that bfloat16 rounding (tests/test_float8.py's GPU
test holds them to an SQNR of 45 dB).
"""

from __future__ import annotations

import functools

import torch

from lowbit._backend import get_backend
from lowbit._inputs import check_float_matrix

__all__ = [
    "AMAX_FLOOR",
    "E4M3",
    "E5M2",
    "float8_mm",
    "fp8_matmul_unavailable_reason",
    "to_float8",
    "use_scaled_mm",
]

E4M3 = torch.float8_e4m3fn  # inputs and weights: more precision (3 mantissa bits), max 448
E5M2 = torch.float8_e5m2  # gradients: more range (5 exponent bits), max 57344
AMAX_FLOOR = 1e-30
# torch._scaled_mm (cuBLASLt / CUTLASS) needs K and N to be multiples of 16.
_SCALED_MM_ALIGN = 16


def to_float8(x: torch.Tensor, fp8_dtype: torch.dtype, *, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Amax-scaled saturating cast: x (M, K) float -> q (M, K) fp8, scale_inv (M, 1) if rowwise else () fp32.

    x is approximately q.float() * scale_inv; see the module docstring for the rule and its edge cases.
    """
    check_float_matrix(x, "to_float8")
    if fp8_dtype not in (E4M3, E5M2):
        raise TypeError(f"to_float8: fp8_dtype must be {E4M3} or {E5M2}, got {fp8_dtype}")
    fp8_max = torch.finfo(fp8_dtype).max
    shape = (x.shape[0], 1) if rowwise else ()
    if x.numel():
        # amax propagates NaN; the max of the values is one of them, so amax in x's dtype is exact.
        amax = (x.abs().amax(dim=1, keepdim=True) if rowwise else x.abs().amax()).float()
    else:
        amax = torch.zeros(shape, dtype=torch.float32, device=x.device)
    finite = torch.isfinite(amax)
    # A true division (python's `fp8_max / amax` is reciprocal-then-multiply, off by an ulp at times).
    scale = torch.where(amax > 0, torch.full_like(amax, fp8_max) / amax.clamp(min=AMAX_FLOOR), 1.0)
    scale = torch.where(finite, scale, 0.0)
    # A non-finite group has scale 0: its finite values give 0, its inf/NaN give NaN, set to 0 here.
    y = torch.nan_to_num(x.float() * scale, nan=0.0)  # out of place: vmap batches these
    q = y.clamp(-fp8_max, fp8_max).to(fp8_dtype)
    scale_inv = torch.where(finite, scale.reciprocal(), torch.nan)
    return q, scale_inv


def _row_scale(scale_inv: torch.Tensor, rows: int) -> torch.Tensor:
    """A scale of shape () or (rows, 1) as (rows, 1) fp32, contiguous."""
    return scale_inv.float().expand(rows, 1).contiguous()


def float8_mm(
    a: torch.Tensor,
    a_scale_inv: torch.Tensor,
    b_t: torch.Tensor,
    b_scale_inv: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    scaled_mm: bool = False,
) -> torch.Tensor:
    """out = (a @ b_t.T) * a_scale_inv * b_scale_inv.T + bias, fp32 accumulate, cast once to out_dtype.

    Args:
        a: (M, K) fp8, any strides.
        a_scale_inv: () or (M, 1) fp32, as `to_float8` returns it.
        b_t: (N, K) fp8, any strides (the weight as it is stored, for x @ w.T).
        b_scale_inv: () or (N, 1) fp32.
        out_dtype: float32, float16 or bfloat16.
        bias: optional (N,), added in fp32.
        scaled_mm: run on torch._scaled_mm (fp8 tensor cores) rather than the simulation.

    Returns:
        (M, N) tensor of `out_dtype`.
    """
    m, k = a.shape
    n = b_t.shape[0]
    if b_t.shape[1] != k:
        raise ValueError(f"float8_mm: cannot multiply {tuple(a.shape)} by {tuple(b_t.shape)}.T")
    if m == 0 or n == 0 or k == 0:
        out = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    elif scaled_mm:
        # Without a bias the tensor-wise GEMM writes out_dtype at once; with one it writes fp32
        # and the bias is added in fp32 below, as in the simulation.
        out = _scaled_mm_padded(a, a_scale_inv, b_t, b_scale_inv, torch.float32 if bias is not None else out_dtype)
    else:
        # The fp8 values are exact in fp32 (and in TF32/bf16, should the matmul use them), so this
        # is the tensor-core product: exact products, fp32 sums, scales applied after.
        acc = a.float() @ b_t.float().t()
        b_cols = b_scale_inv.reshape(1, -1) if b_scale_inv.dim() else b_scale_inv
        out = acc * a_scale_inv * b_cols
    if bias is not None:
        out = out.float() + bias.float()
    return out.to(out_dtype)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_fp8(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """x (r, c) fp8 -> (rows, cols) contiguous, zero-padded at the end of each dimension."""
    if tuple(x.shape) == (rows, cols):
        return x.contiguous()
    # Zero bytes are +0.0 in both fp8 formats; uint8 zeros avoid relying on an fp8 fill kernel.
    out = torch.zeros(rows, cols, dtype=torch.uint8, device=x.device).view(x.dtype)
    out[: x.shape[0], : x.shape[1]].copy_(x)
    return out


def _scaled_mm_padded(
    a: torch.Tensor, a_scale_inv: torch.Tensor, b_t: torch.Tensor, b_scale_inv: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """torch._scaled_mm for any M, K, N: pads K and N to multiples of 16, slices the output back.

    Tensor-wise scales give `out_dtype`, row-wise ones bfloat16 (what every torch version with
    row-wise _scaled_mm accepts).
    """
    m, k = a.shape
    n = b_t.shape[0]
    k_pad, n_pad = _round_up(k, _SCALED_MM_ALIGN), _round_up(n, _SCALED_MM_ALIGN)
    a = _pad_fp8(a, m, k_pad)  # row-major (M, K_pad); zero columns add nothing to the sums
    b = _pad_fp8(b_t, n_pad, k_pad).t()  # column-major (K_pad, N_pad), as _scaled_mm requires
    if a_scale_inv.dim() == 0 and b_scale_inv.dim() == 0:
        out = torch._scaled_mm(a, b, scale_a=a_scale_inv.float(), scale_b=b_scale_inv.float(), out_dtype=out_dtype)
    else:
        # Row-wise needs both scales row-wise: a tensor scale is broadcast to (M, 1) or (1, N).
        scale_a = _row_scale(a_scale_inv, m)
        scale_b = torch.ones(n_pad, 1, dtype=torch.float32, device=a.device)
        scale_b[:n] = _row_scale(b_scale_inv, n)
        out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b.t().contiguous(), out_dtype=torch.bfloat16)
    return out[:, :n]


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _cpu_scaled_mm_missing() -> str | None:
    """None where the CPU _scaled_mm takes both scalings lowbit uses, else what it lacks."""
    a = torch.zeros(16, 16, dtype=E4M3)
    one = torch.ones((), dtype=torch.float32)
    try:
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, AttributeError):
        return "this torch build has no CPU torch._scaled_mm"
    # torch 2.11's CPU _scaled_mm is per-tensor only (an internal assert on row-wise scales); 2.14's
    # takes row-wise ones too. The switchback recipe needs them, so without them the CPU has no real fp8.
    rows = torch.ones(16, 1, dtype=torch.float32)
    try:
        torch._scaled_mm(a, a.t(), scale_a=rows, scale_b=rows.t().contiguous(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return f"torch {torch.__version__}'s CPU torch._scaled_mm has no row-wise scaling"
    return None


def fp8_matmul_unavailable_reason(device: torch.device | str) -> str | None:
    """None where torch._scaled_mm runs on `device`, else why not.

    CUDA needs compute capability >= 8.9 (Ada, Hopper, Blackwell). The CPU has torch's reference
    _scaled_mm in recent versions: correct, slow, useful to test the real path without a GPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if torch.version.hip is not None:
            return "ROCm GPUs are not supported by lowbit's fp8 path (their fp8 formats are the fnuz variants)"
        major, minor = _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())
        if (major, minor) < (8, 9):
            return (
                f"{device} has compute capability {major}.{minor}; fp8 tensor cores need >= 8.9 "
                "(Ada, Hopper, Blackwell)"
            )
        return None
    if device.type == "cpu":
        return _cpu_scaled_mm_missing()
    return f"torch has no fp8 matmul on {device.type} devices"


def use_scaled_mm(simulate: bool | None, device: torch.device) -> bool:
    """Whether the matmuls run on torch._scaled_mm: `simulate` None -> on CUDA GPUs that have fp8,
    unless the backend switch asks for the plain-torch reference (LOWBIT_BACKEND=torch).

    Raises:
        RuntimeError: simulate=False on a device without an fp8 matmul, with the fix.
    """
    if simulate:
        return False
    if simulate is None:
        if get_backend() == "torch":
            return False
        return device.type == "cuda" and fp8_matmul_unavailable_reason(device) is None
    reason = fp8_matmul_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(
            f"Float8Linear(simulate=False) needs an fp8 matmul, but {reason}. Use simulate=None "
            "(real fp8 where the GPU has it, simulated elsewhere) or simulate=True, or run on a GPU "
            "with compute capability >= 8.9."
        )
    return True
