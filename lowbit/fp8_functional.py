"""float8 linear as an autograd Function: which matmul runs in fp8 with which scales, and what is saved.

Paper (Wortsman, Dettmers et al. 2023, section 3): "tensorwise" is the fp8 baseline, every matmul in
fp8 with one scale per tensor (e4m3 for x and w, e5m2 for the gradient); it diverges at scale unless
feature magnitudes stay small, e.g. with zero-init layer-scale. "switchback" applies SwitchBack's
split to fp8: x and the gradient scaled per row, the weight per tensor, and the weight gradient
(inner dimension batch x sequence) in the input's dtype.
"""

from __future__ import annotations

import torch

from lowbit import fp8_ops
from lowbit._inputs import (
    autocast_linear_inputs,
    autocast_off,
    check_linear_inputs,
    needs_autograd,
    unflatten_output,
)
from lowbit.fp8_config import Float8Config
from lowbit.fp8_ops import E4M3, E5M2

__all__ = ["float8_linear"]

_DEFAULT_CONFIG = Float8Config()


def _output(x, weight, bias, config: Float8Config, scaled_mm: bool):
    """out = x @ w.T + bias with x and w in e4m3; also returns x's fp8 copy and scale."""
    x_fp8, x_scale_inv = fp8_ops.to_float8(x, E4M3, rowwise=config.recipe == "switchback")
    w_fp8, w_scale_inv = fp8_ops.to_float8(weight, E4M3, rowwise=False)
    out = fp8_ops.float8_mm(
        x_fp8, x_scale_inv, w_fp8, w_scale_inv, bias=bias, out_dtype=x.dtype, scaled_mm=scaled_mm
    )
    return out, x_fp8, x_scale_inv


class _Float8Matmul(torch.autograd.Function):
    """out (M, N) = x (M, K) @ weight (N, K).T + bias, with the recipe's fp8 matmuls."""

    @staticmethod
    def forward(ctx, input, weight, bias, config: Float8Config, scaled_mm: bool):
        # Flattened here rather than by the caller, so the output is a fresh tensor as nn.Linear's is.
        ctx.input_shape = input.shape
        x = input.reshape(-1, input.shape[-1])
        out, x_fp8, x_scale_inv = _output(x, weight, bias, config, scaled_mm)

        ctx.config = config
        ctx.scaled_mm = scaled_mm
        ctx.bias_dtype = None if bias is None else bias.dtype
        # The weight is a Parameter, kept anyway; its fp8 copy is made again in backward (same amax,
        # same values) rather than held. x is needed only for grad_weight: "tensorwise" keeps its fp8
        # copy (a quarter of fp32's memory), "switchback" keeps x itself (its grad_weight is high precision).
        saved_weight = weight if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            ctx.save_for_backward(saved_weight)
        elif config.recipe == "tensorwise":
            ctx.save_for_backward(saved_weight, x_fp8, x_scale_inv)
        else:
            ctx.save_for_backward(saved_weight, x)
        return unflatten_output(out, input)

    @staticmethod
    def backward(ctx, grad_output):
        weight, *saved_x = ctx.saved_tensors
        grad_output = grad_output.reshape(-1, grad_output.shape[-1])
        config, scaled_mm = ctx.config, ctx.scaled_mm
        tensorwise = config.recipe == "tensorwise"
        grad_input = grad_weight = grad_bias = None

        # grad_output in e5m2: one scale ("tensorwise", shared by both gemms below) or one per row.
        if ctx.needs_input_grad[0] or (tensorwise and ctx.needs_input_grad[1]):
            g_fp8, g_scale_inv = fp8_ops.to_float8(grad_output, E5M2, rowwise=not tensorwise)

        # grad_input (M, K) = g (M, N) @ w (N, K): g e5m2, w e4m3 per tensor.
        if ctx.needs_input_grad[0]:
            w_fp8, w_scale_inv = fp8_ops.to_float8(weight, E4M3, rowwise=False)
            grad_input = fp8_ops.float8_mm(
                g_fp8, g_scale_inv, w_fp8.t(), w_scale_inv, out_dtype=grad_output.dtype, scaled_mm=scaled_mm
            ).view(ctx.input_shape)

        # grad_weight (N, K) = g.T (N, M) @ x (M, K): fp8 for "tensorwise", the input's dtype for "switchback".
        if ctx.needs_input_grad[1]:
            if tensorwise:
                x_fp8, x_scale_inv = saved_x
                grad_weight = fp8_ops.float8_mm(
                    g_fp8.t(), g_scale_inv, x_fp8.t(), x_scale_inv, out_dtype=grad_output.dtype, scaled_mm=scaled_mm
                )
            else:
                grad_weight = grad_output.t().mm(saved_x[0])

        # grad_bias = sum of g over the rows, in high precision.
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(dim=0).to(ctx.bias_dtype)

        return grad_input, grad_weight, grad_bias, None, None


def float8_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: Float8Config = _DEFAULT_CONFIG,
) -> torch.Tensor:
    """float8 F.linear: input (..., K) @ weight (N, K).T + bias -> (..., N) in the input's dtype.

    Args:
        input: (..., K) float32/float16/bfloat16, any strides, at least 2-D.
        weight: (N, K) of the input's dtype (under autocast both are cast, as for F.linear).
        bias: optional (N,).
        config: the recipe and whether to simulate (see Float8Config).

    Returns:
        (..., N) tensor. A row holding inf or NaN gives NaN in its output row ("switchback") or in
        the whole output ("tensorwise": one scale for the tensor); an all-zero input gives the bias.

    Raises:
        RuntimeError: config.simulate is False and the input's device has no fp8 matmul.
    """
    input, weight, bias = autocast_linear_inputs(input, weight, bias)
    check_linear_inputs(input, weight, bias, "float8_linear")
    scaled_mm = fp8_ops.use_scaled_mm(config.simulate, input.device)
    with autocast_off(input.device.type):  # inputs are already cast; the fp8 ops pick their own dtypes
        if needs_autograd(input, weight, bias):
            return _Float8Matmul.apply(input, weight, bias, config, scaled_mm)
        out = _output(input.reshape(-1, input.shape[-1]), weight, bias, config, scaled_mm)[0]
        return unflatten_output(out, input)
