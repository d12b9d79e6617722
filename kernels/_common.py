"""Pieces every int8 kernel shares: the quantize rule as Triton device code, and launcher checks.

The rule (lowbit/int8/ops.py is the contract, these helpers copy its torch twin op for op):
    boost = 2**64 if a < 2**-64 else 1               (exact: keeps 127 / a finite for tiny groups)
    inv = 127 * (1 / (a * boost))  if 0 < a < inf  else 0
    q   = clamp(rint((x * boost) * inv), -127, 127), NaN -> 0   (fp32, ties to even)
    scale = a if a < inf else NaN
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.torch_version import TorchVersion

from lowbit._inputs import check_float_matrix as _check_float_matrix


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older versions read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Fixed at import, as triton.jit fixes it: kernels run on numpy (CPU tensors) when set.
INTERPRET = _interpreting()


def _shim_interpreter_index() -> None:
    """Triton <= 3.6's interpreter turns a scalar into an int with int(data) on its 1-element array,
    which numpy >= 2.4 refuses (TypeError: only 0-dimensional arrays ...), so range(0, K, ...) over a
    kernel argument fails; triton 3.8 squeezes first. Wrap its tensor patch to do the same."""
    import numpy as np
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_lowbit_squeeze", False):
        return

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(())))

    _patch_lang_tensor._lowbit_squeeze = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


# TorchVersion compares a version string with a tuple, as torch.__version__ does.
if INTERPRET and TorchVersion(triton.__version__) < (3, 8):
    _shim_interpreter_index()

# fp32 multiply-add contraction would let a later add absorb an unrounded product; every kernel is
# launched with it off so each fp32 op rounds exactly as its torch twin's does.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


if INTERPRET:

    @triton.jit
    def _rint(y):
        """Round to nearest, ties to even, for |y| < 2**22 (and inf/NaN pass through).

        The interpreter has no libdevice; adding 1.5 * 2**23 lands y where the fp32 spacing is 1, so
        the add itself rounds (ties to even, as 1.5 * 2**23 is even) and the subtract is exact.
        """
        return (y + 12582912.0) - 12582912.0

else:
    from triton.language.extra import libdevice

    @triton.jit
    def _rint(y):
        """Round to nearest, ties to even (cvt.rni.f32.f32)."""
        return libdevice.rint(y)


if INTERPRET:

    @triton.jit
    def _cast_rne(x, dtype: tl.constexpr):
        """fp32 -> dtype, round to nearest even, as the GPU's cvt.rn does.

        The interpreter truncates fp32 -> bf16, so do that one by hand: add 0x7FFF plus the lowest kept
        bit, then drop the low 16 bits (carries into the exponent round up to the next binade or inf).
        """
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(x != x, 0x7FC0, bits)  # noqa: PLR0124 (NaN test: the add may carry a payload off)
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

else:

    @triton.jit
    def _cast_rne(x, dtype: tl.constexpr):
        """fp32 -> dtype, round to nearest even (Triton's default for fp downcasts)."""
        return x.to(dtype)


@triton.jit
def _nan_to_inf_abs(x):
    """|x| in fp32 with NaN turned into +inf: tl.max drops NaN, and inf flags the group the same way."""
    x = x.to(tl.float32)
    return tl.where(x != x, float("inf"), tl.abs(x))  # noqa: PLR0124 (NaN test)


@triton.jit
def _boost(absmax):
    """2**64 for a group whose absmax is below 2**-64, else 1 (see the twin's `_boost` in lowbit/int8/ops.py)."""
    return tl.where(absmax < 5.421010862427522e-20, 18446744073709551616.0, 1.0)


@triton.jit
def _scale_inverse(absmax):
    """127 / (absmax * boost) as torch computes it (reciprocal, then times 127), 0 where absmax is 0 or inf."""
    a = absmax * _boost(absmax)
    usable = (a > 0.0) & (a < float("inf"))
    safe = tl.where(usable, a, 1.0)
    # div_rn: Triton's fp32 `/` is approximate on CUDA; torch's reciprocal is correctly rounded.
    return tl.where(usable, tl.math.div_rn(1.0, safe) * 127.0, 0.0)


@triton.jit
def _quantize(x, inv, boost):
    """q = clamp(rint((x * boost) * inv), -127, 127) as int8; inv == 0 marks a zero or non-finite group (q = 0)."""
    q = _rint((x.to(tl.float32) * boost) * inv)
    q = tl.where(q != q, 0.0, q)  # noqa: PLR0124 (NaN: inf * 0 in a non-finite group)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    return q.to(tl.int8)


@triton.jit
def _load_tile(x_ptr, M, K, stride_xm, stride_xk, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):
    """This program's (BLOCK_SIZE_M, BLOCK_SIZE_K) tile of x (M, K) on a 2-D grid, zeros past the edges.

    Returns the tile, its int64 row and column offsets (M * K may pass 2**31) and its mask.
    """
    offs_m = (tl.program_id(0) * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    offs_k = (tl.program_id(1) * BLOCK_SIZE_K + tl.arange(0, BLOCK_SIZE_K)).to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    return x, offs_m, offs_k, mask


@triton.jit
def _scale_out(absmax):
    """The stored scale: the absmax, or NaN where the group held inf or NaN."""
    return tl.where(absmax < float("inf"), absmax, float("nan"))


def check_float_matrix(x: torch.Tensor, op: str) -> None:
    """A 2-D fp32/fp16/bf16 tensor (lowbit._inputs' rule) on a device the kernels can run on."""
    _check_float_matrix(x, op)
    check_device(x, op)


def check_device(x: torch.Tensor, op: str) -> None:
    if not x.is_cuda and not INTERPRET:
        raise ValueError(
            f"{op}: Triton kernels need a CUDA tensor, got one on {x.device}; for CPU tensors set "
            "TRITON_INTERPRET=1 before importing triton, or use lowbit's torch backend."
        )
