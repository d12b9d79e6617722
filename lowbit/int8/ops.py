"""The int8 ops SwitchBack is built from, each dispatched per call to Triton or to its torch twin.

Every op has one numerical rule, written here as plain torch; the Triton kernel in `lowbit.kernels`
of the same name must give the same int8 values (bit for bit) and the same outputs up to fp32
rounding. The rules:

  quantize (per row, per column or per tensor), absmax a over the group:
      q = clamp(rint(x * (127 * (1 / a))), -127, 127)   in fp32, ties to even
                       (groups with a < 2**-64 first scaled by 2**64, exactly, so 127 / a stays finite)
      a == 0           -> q = 0, scale a = 0             (an all-zero row stays zero, never NaN)
      a not finite     -> q = 0, scale a = NaN           (inf/NaN poison their own output row only)
  dequantize after an int32 accumulate:
      out = acc * (a_row * b_col * (1 / 127**2)) + bias   in fp32, cast once to the output dtype

Scales are the fp32 absmax of each group (not absmax / 127): it is what the paper's kernels store.
"""

from __future__ import annotations

import torch

from lowbit._backend import use_triton
from lowbit._inputs import FLOAT_DTYPES, LINEAR_DTYPES, MAX_INNER_DIM, check_float_matrix, check_int8_matmul

__all__ = [
    "quantize_rowwise",
    "quantize_rowwise_column_sums",
    "quantize_tensorwise",
    "quantize_tensorwise_and_transpose",
    "quantize_colwise_transposed",
    "dequantize_rowwise",
    "mm_dequantized",
    "int8_matmul_dequant",
    "MAX_INNER_DIM",
]



def _kernels():
    """The Triton launchers: called directly in eager mode, as custom ops under torch.compile."""
    if torch.compiler.is_compiling():
        from lowbit.int8 import _compiled_ops

        return _compiled_ops
    from lowbit import kernels  # imported on first use: the package imports without Triton

    return kernels


def _triton_reads(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can read these tensors' memory: not torch.func wrappers (grad's
    tracked, vmap's batched tensors, as a backward under a transform sees its saved tensors), which
    have no storage; those take the torch twin, which the transforms know how to run.

    Under torch.compile the traced graph holds no such wrappers.
    """
    return torch.compiler.is_compiling() or not any(
        torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors
    )


def _scale_inverse(absmax: torch.Tensor) -> torch.Tensor:
    """127 * (1 / absmax) where absmax is positive and finite, else 0 (so q = 0 there, never NaN).

    Written as a correctly rounded reciprocal times 127 (what torch does for `127.0 / t` anyway),
    so the kernels can repeat it exactly with div_rn(1, a) * 127.
    """
    usable = torch.isfinite(absmax) & (absmax > 0)
    return torch.where(usable, torch.where(usable, absmax, 1.0).reciprocal() * 127.0, 0.0)


def _nan_if_not_finite(absmax: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(absmax), absmax, torch.nan)


def _boost(absmax: torch.Tensor) -> torch.Tensor:
    """2**64 for groups with absmax < 2**-64, else 1.

    127 / absmax overflows fp32 for absmax below ~3.7e-37, which would saturate every value of the
    group; scaling x and absmax by a power of two first is exact and leaves other groups untouched.
    """
    return torch.where(absmax < 2.0**-64, 2.0**64, 1.0)


def _quantize_torch(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """q = clamp(rint(x * (127 / absmax))) with absmax broadcast against x."""
    boost = _boost(absmax)
    q = torch.round((x.float() * boost) * _scale_inverse(absmax * boost))
    # Only a group with a non-finite absmax (scale inverse 0) can hold inf/NaN, and inf * 0 is NaN.
    return torch.nan_to_num_(q, nan=0.0).clamp_(-127, 127).to(torch.int8)


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8: x (M, K) float -> q (M, K) int8 contiguous, absmax (M,) fp32."""
    check_float_matrix(x, "quantize_rowwise")
    if use_triton(x):
        return _kernels().launch_quantize_rowwise(x)
    # amax propagates NaN, so a row holding NaN gets a NaN absmax; an empty row (K = 0) has absmax 0.
    absmax = x.float().abs().amax(dim=1) if x.shape[1] else x.new_zeros(x.shape[0], dtype=torch.float32)
    q = _quantize_torch(x, absmax[:, None]).contiguous()
    return q, _nan_if_not_finite(absmax)


def quantize_rowwise_column_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_rowwise(x) and the fp32 column sums of x (K,), from one read of x on the Triton path.

    SwitchBack's grad_bias is the column sum of g, whose rows are quantized for grad_input anyway.
    The sums are fp32 additions of x's values; their order (and so the last bits) is the backend's.
    """
    check_float_matrix(x, "quantize_rowwise_column_sums")
    if use_triton(x):
        return _kernels().launch_quantize_rowwise_column_sums(x)
    q, absmax = quantize_rowwise(x)
    return q, absmax, x.float().sum(dim=0)


def quantize_tensorwise(x: torch.Tensor, *, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-wise absmax int8: x (M, K) -> q (M, K), or (K, M) if transpose, int8 contiguous; absmax () fp32."""
    check_float_matrix(x, "quantize_tensorwise")
    if use_triton(x):
        return _kernels().launch_quantize_tensorwise(x, transpose=transpose)
    absmax = x.float().abs().amax() if x.numel() else x.new_zeros((), dtype=torch.float32)
    q = _quantize_torch(x, absmax)
    q = q.t().contiguous() if transpose else q.contiguous()
    return q, _nan_if_not_finite(absmax)


def quantize_tensorwise_and_transpose(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensor-wise absmax int8 both ways: x (M, K) -> q (M, K), q^T (K, M), both contiguous; absmax () fp32.

    One pass on the Triton path. SwitchBack's tensor-wise weight: q for the forward, q^T kept for
    grad_input (the same values quantize_tensorwise gives w.T), so the weight is quantized once a step.
    """
    check_float_matrix(x, "quantize_tensorwise_and_transpose")
    if use_triton(x):
        return _kernels().launch_quantize_tensorwise_and_transpose(x)
    q, absmax = quantize_tensorwise(x)
    return q, q.t().contiguous(), absmax


def quantize_colwise_transposed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-wise absmax int8, stored transposed: x (M, K) -> q (K, M) int8 contiguous, absmax (K,) fp32.

    q[k, m] = rint(127 * x[m, k] / absmax[k]); used for the row-wise variant's grad_input, where the
    weight is scaled per input feature and the int8 GEMM wants it K-major.
    """
    check_float_matrix(x, "quantize_colwise_transposed")
    if use_triton(x):
        return _kernels().launch_quantize_colwise_transposed(x)
    absmax = x.float().abs().amax(dim=0) if x.shape[0] else x.new_zeros(x.shape[1], dtype=torch.float32)
    q = _quantize_torch(x, absmax[None, :]).t().contiguous()
    return q, _nan_if_not_finite(absmax)


def _check_int8_rows(q: torch.Tensor, absmax: torch.Tensor, op: str) -> None:
    """q a 2-D int8 tensor and absmax its (rows,) fp32 scales, on q's device."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"{op}: expected a 2-D int8 tensor, got {getattr(q, 'dtype', type(q))} "
                        f"{tuple(getattr(q, 'shape', ()))}")
    if absmax.shape != (q.shape[0],) or absmax.dtype != torch.float32:
        raise ValueError(f"{op}: absmax must be ({q.shape[0]},) float32, got {absmax.dtype} {tuple(absmax.shape)}")
    if absmax.device != q.device:
        raise ValueError(f"{op}: q on {q.device} but absmax on {absmax.device}")


def _dequantize_rowwise_torch(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * (absmax[:, None] / 127.0)).to(dtype).contiguous()


def dequantize_rowwise(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x_hat = q * (absmax / 127) per row: q (M, K) int8, absmax (M,) fp32 -> (M, K) contiguous in `dtype`.

    The product is formed in fp32 and rounded once to `dtype` (float16/bfloat16/float32/float64).
    """
    _check_int8_rows(q, absmax, "dequantize_rowwise")
    if dtype not in LINEAR_DTYPES:
        raise TypeError(f"dequantize_rowwise: dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    if use_triton(q) and _triton_reads(q, absmax):
        return _kernels().launch_dequantize_rowwise(q, absmax, dtype)
    return _dequantize_rowwise_torch(q, absmax, dtype)


def mm_dequantized(a: torch.Tensor, q: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """a @ dequantize_rowwise(q, absmax, a.dtype): a (M, K) float, q (K, N) int8 with row scales (K,).

    Mem-efficient SwitchBack's weight gradient g.T @ x from int8 x. On the Triton path x is
    dequantized tile by tile inside the GEMM (never written in 16-bit); the values it multiplies are
    the twin's, the sums fp32 in the kernel's order, rounded once to a's dtype.
    """
    if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.dtype not in LINEAR_DTYPES:
        raise TypeError(f"mm_dequantized: a must be a 2-D float tensor, got {getattr(a, 'dtype', type(a))}")
    _check_int8_rows(q, absmax, "mm_dequantized")
    if q.shape[0] != a.shape[1]:
        raise ValueError(f"mm_dequantized: cannot multiply {tuple(a.shape)} by int8 {tuple(q.shape)}")
    if a.device != q.device:
        raise ValueError(f"mm_dequantized: a on {a.device} but q on {q.device}")
    # The kernel's output carries no autograd graph: where a gradient of a is being recorded (a
    # backward under create_graph differentiating mem-efficient's weight gradient in g), the twin.
    differentiable = torch.is_grad_enabled() and a.requires_grad
    if a.dtype in FLOAT_DTYPES and use_triton(a) and _triton_reads(a, q, absmax) and not differentiable:
        return _kernels().launch_mm_dequant_rows(a, q, absmax)
    return a.mm(_dequantize_rowwise_torch(q, absmax, a.dtype))


def _int_mm_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (K, N) -> exact int32 (M, N), for any strides and any torch >= the floor."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=a.device)
    if 1 in (m, k, n):
        # A size-1 dimension makes an outer product or a matrix-vector product, whose M * K * N
        # products are no more than the larger operand or the output. Summed as integers here,
        # never through an int8 GEMM: `.contiguous()` keeps whatever stride a size-1 dimension
        # has (w_int8.t() of shape (1, N) keeps strides (1, 1)), and GEMMs that read the
        # leading dimension from those strides can sum the wrong elements.
        prod = a.to(torch.int32).unsqueeze(2) * b.to(torch.int32).unsqueeze(0)
        return prod.sum(1, dtype=torch.int64).to(torch.int32)
    # CUDA's int8 GEMM needs M > 16 and K, N multiples of 8; the CPU one takes any shape.
    if not a.is_cuda or (m > 16 and k % 8 == 0 and n % 8 == 0):
        return torch._int_mm(a.contiguous(), b.contiguous())
    # Elsewhere emulate: every partial sum is an integer below 2**53, so fp64 is exact.
    return (a.double() @ b.double()).to(torch.int32)


def int8_matmul_dequant(
    a: torch.Tensor,
    b: torch.Tensor,
    a_absmax: torch.Tensor,
    b_absmax: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """out = (a @ b) * (a_absmax[:, None] * b_absmax / 127**2) + bias, accumulated in int32.

    Args:
        a: (M, K) int8, any strides.
        b: (K, N) int8, any strides (pass `w_int8.t()` for x @ w.T).
        a_absmax: (M,) fp32 row scales of `a`.
        b_absmax: () fp32 tensor scale, or (N,) fp32 column scales of `b`.
        bias: optional (N,) bias, added in fp32.
        out_dtype: float32, float16 or bfloat16.

    Returns:
        (M, N) tensor of `out_dtype`.
    """
    check_int8_matmul(a, b, a_absmax, b_absmax, bias, out_dtype, "int8_matmul_dequant")
    if use_triton(a):
        return _kernels().launch_int8_matmul_dequant(a, b, a_absmax, b_absmax, bias=bias, out_dtype=out_dtype)
    scale = a_absmax[:, None].float() * (b_absmax.float() * (1.0 / 127**2))
    out = _int_mm_exact(a, b).float() * scale
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
