"""Checks, constants and autocast handling shared by every format and by the kernels: one place
decides what a bad input is. Imports nothing but torch (the kernels import it without Triton's
compiler, the formats without Triton)."""

from __future__ import annotations

import contextlib
import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# |sum of K products of int8 values in [-127, 127]| <= K * 127**2 must fit in int32.
MAX_INNER_DIM = (2**31 - 1) // 127**2
# What the layers take, as nn.Linear does. float64 is quantized by the same rule from its fp32
# rounding (int8 / fp8 hold less than either), and its outputs and gradients are float64.
LINEAR_DTYPES = (*FLOAT_DTYPES, torch.float64)


class LinearShapeError(ValueError, RuntimeError):
    """A bad shape for a lowbit linear. Also a RuntimeError, the class F.linear raises for it."""


class LinearDtypeError(TypeError, RuntimeError):
    """A bad dtype for a lowbit linear. Also a RuntimeError, the class F.linear raises for it."""


def check_float_matrix(x: torch.Tensor, op: str) -> None:
    """Raise unless x is a 2-D float32/float16/bfloat16 tensor: what every quantize op takes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: expected float32, float16 or bfloat16, got {x.dtype}")


def check_int8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    a_absmax: torch.Tensor,
    b_absmax: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    op: str,
) -> None:
    """Raise unless int8 a (M, K) @ b (K, N) with scales (M,) and () or (N,), bias (N,) is well formed."""
    for name, t in (("a", a), ("b", b), ("a_absmax", a_absmax), ("b_absmax", b_absmax), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"{op}: operands must be int8, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{op}: cannot multiply {tuple(a.shape)} by {tuple(b.shape)}")
    (m, k), n = a.shape, b.shape[1]
    if k > MAX_INNER_DIM:
        raise ValueError(f"{op}: inner dimension {k} > {MAX_INNER_DIM} could overflow the int32 accumulator")
    if a_absmax.shape != (m,) or b_absmax.shape not in ((), (n,)):
        raise ValueError(
            f"{op}: scales of shape {tuple(a_absmax.shape)} and {tuple(b_absmax.shape)} do not fit "
            f"a ({m}, {k}) @ ({k}, {n}) product: expected ({m},) and () or ({n},)"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{op}: bias of shape {tuple(bias.shape)}, expected ({n},)")
    scales = (a_absmax, b_absmax) + ((bias,) if bias is not None else ())
    for t in scales:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: scales and bias must be float32, float16 or bfloat16, got {t.dtype}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    devices = {t.device for t in (a, b) + scales}
    if len(devices) != 1:
        raise ValueError(f"{op}: tensors on different devices {sorted(str(d) for d in devices)}")


def linear_inputs(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What every lowbit F.linear does first: cast as autocast would, then check (check_linear_inputs)."""
    input, weight, bias = autocast_linear_inputs(input, weight, bias)
    check_linear_inputs(input, weight, bias, layer)
    return input, weight, bias


def vmap_each_member(info, in_dims, apply, input, weight, bias, *args):
    """A vmap rule that runs `apply(input, weight, bias, *args)` once per batch member and stacks.

    For a batch of weights (model ensembles), or formats whose scales span the whole tensor: each
    member is its own layer, quantized on its own, so a batch is not just more rows. `apply` may
    return a tensor or a tuple of tensors; every output is batched along dim 0.
    """

    def member(t, dim, i):
        return t if dim is None else t.select(dim, i)

    input_dim, weight_dim, bias_dim = in_dims[:3]
    outs = [
        apply(member(input, input_dim, i), member(weight, weight_dim, i), member(bias, bias_dim, i), *args)
        for i in range(info.batch_size)
    ]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


# torch 2.11's dynamo cannot trace torch.amp.is_autocast_available (torch._C._is_autocast_available is
# skipped: a graph break, an error under fullgraph); 2.14's can. So ask once per device type, eagerly.
_AUTOCAST_AVAILABLE = {d: torch.amp.is_autocast_available(d) for d in ("cpu", "cuda", "meta")}


def autocast_available(device_type: str) -> bool:
    """torch.amp.is_autocast_available(device_type), cached (compiled code reads the cache)."""
    if device_type not in _AUTOCAST_AVAILABLE:
        _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    return _AUTOCAST_AVAILABLE[device_type]


def autocast_linear_inputs(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cast to the autocast dtype when autocast is on for the input's device, as F.linear would be."""
    device_type = input.device.type
    if not autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return input.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def check_linear_inputs(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: str
) -> None:
    """Raise a clear error for inputs a lowbit linear does not take (after autocast casting).

    Accepted is what F.linear accepts: input (in_features,) or (..., in_features), any size
    (zero included), float16/bfloat16/float32/float64, weight and bias of the input's dtype.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{layer}: expected a torch.Tensor input, got {type(input).__name__}")
    if input.dim() < 1:
        raise LinearShapeError(f"{layer}: expected an input of shape (..., in_features), got a 0-dim tensor")
    if weight.dim() != 2:
        raise LinearShapeError(f"{layer}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if input.shape[-1] != weight.shape[1]:
        raise LinearShapeError(
            f"{layer}: input of shape {tuple(input.shape)} has {input.shape[-1]} features, the layer "
            f"expects {weight.shape[1]}"
        )
    if input.dtype not in LINEAR_DTYPES:
        raise LinearDtypeError(
            f"{layer}: input must be float16, bfloat16, float32 or float64, got {input.dtype}"
        )
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        raise LinearDtypeError(
            f"{layer}: input is {input.dtype} but the weight is {weight.dtype}"
            + (f" and the bias {bias.dtype}" if bias is not None else "")
            + "; cast the input or the layer (layer.to(dtype)), or run under torch.autocast"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise LinearShapeError(f"{layer}: bias of shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    devices = {input.device, weight.device} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise LinearShapeError(
            f"{layer}: input on {input.device} but the weight on {weight.device}"
            + (f" and the bias on {bias.device}" if bias is not None else "")
            + "; move them to one device"
        )


def quantizable(x: torch.Tensor) -> torch.Tensor:
    """x as the quantize ops take it: float64 rounds to float32 first (exact enough for 8 bits)."""
    return x.float() if x.dtype == torch.float64 else x


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a low-precision matmul writes for a layer of `dtype` (float64: float32, cast after)."""
    return torch.float32 if dtype == torch.float64 else dtype


def autocast_off(device_type: str):
    """A context with autocast off for `device_type` (a no-op where autocast does not exist)."""
    if autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def flatten_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (M, K), M the product of the leading dims (0 included, which reshape(-1, K) refuses)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def unflatten_output(out: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """(M, N) -> (..., N) with the input's leading dims, as a tensor autograd does not treat as a view.

    A view returned from a custom autograd Function may not be modified in place (timm's in-place
    LayerScale, FSDP2's hooks do); aten's matmul returns its reshaped result the same way.
    """
    return torch.ops.aten._unsafe_view(out, (*input.shape[:-1], out.shape[-1]))
