"""float8 linear as an autograd Function: which matmul runs in fp8 with which scales, and what is saved.

Paper (Wortsman, Dettmers et al. 2023, section 3): "tensorwise" is the fp8 baseline, every matmul in
fp8 with one scale per tensor (e4m3 for x and w, e5m2 for the gradient); it diverges at scale unless
feature magnitudes stay small, e.g. with zero-init layer-scale. "switchback" applies SwitchBack's
split to fp8: x and the gradient scaled per row, the weight per tensor, and the weight gradient
(inner dimension batch x sequence) in the input's dtype.
"""

from __future__ import annotations

import torch

from lowbit._inputs import (
    autocast_off,
    flatten_rows,
    linear_inputs,
    matmul_dtype,
    quantizable,
    unflatten_output,
    vmap_each_member,
)
from lowbit.float8 import ops as fp8_ops
from lowbit.float8.config import Float8Config
from lowbit.float8.ops import E4M3, E5M2

__all__ = ["float8_linear"]

_DEFAULT_CONFIG = Float8Config()


def _output(x, weight, bias, config: Float8Config, scaled_mm: bool, input_fp8: torch.dtype):
    """out = x @ w.T + bias with x in `input_fp8` and w in e4m3; also returns x's fp8 copy and scale."""
    x_fp8, x_scale_inv = fp8_ops.to_float8(quantizable(x), input_fp8, rowwise=config.activation_scaling == "row")
    w_fp8, w_scale_inv = fp8_ops.to_float8(quantizable(weight), E4M3, rowwise=False)
    out = fp8_ops.float8_mm(
        x_fp8, x_scale_inv, w_fp8, w_scale_inv, bias=bias, out_dtype=matmul_dtype(x.dtype), scaled_mm=scaled_mm
    )
    return out.to(x.dtype), x_fp8, x_scale_inv


class _Float8Matmul(torch.autograd.Function):
    """(out (..., N), x_fp8, x_scale_inv) for out = input (..., K) @ weight (N, K).T + bias.

    The input is cast to `input_fp8` (e4m3 in the forward; e5m2 when this Function computes a
    grad_input, whose "input" is the gradient), the weight to e4m3. grad_input is this Function with
    w.T as its weight, so the backward is differentiable ("switchback") and batched by vmap.
    """

    @staticmethod
    def forward(input, weight, bias, config: Float8Config, scaled_mm: bool, input_fp8: torch.dtype):
        x = flatten_rows(input)
        out, x_fp8, x_scale_inv = _output(x, weight, bias, config, scaled_mm, input_fp8)
        # Flattened here rather than by the caller, so the output is a fresh tensor as nn.Linear's is.
        return unflatten_output(out, input), x_fp8, x_scale_inv

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, config, scaled_mm, _ = inputs
        _, x_fp8, x_scale_inv = output
        ctx.mark_non_differentiable(x_fp8, x_scale_inv)
        ctx.set_materialize_grads(False)  # their gradients are never read: no zero tensors for them
        ctx.config = config
        ctx.scaled_mm = scaled_mm
        ctx.input_shape = input.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        # The weight is a Parameter, kept anyway; its fp8 copy is made again in backward (same amax,
        # same values) rather than held. x is needed only for grad_weight: "tensorwise" keeps its fp8
        # copy (a quarter of fp32's memory), "switchback" keeps x itself (its grad_weight is high precision).
        if not ctx.needs_input_grad[1]:
            ctx.save_for_backward(weight)
        elif config.grad_weight == "fp8":
            ctx.save_for_backward(weight, x_fp8, x_scale_inv)
        else:
            ctx.save_for_backward(weight, input)

    @staticmethod
    def backward(ctx, grad_output, _grad_x_fp8, _grad_x_scale_inv):
        if grad_output is None:  # (not materialized: nothing reached the output)
            return None, None, None, None, None, None
        weight, *saved_x = ctx.saved_tensors
        g = flatten_rows(grad_output)
        config, scaled_mm = ctx.config, ctx.scaled_mm
        grad_input = grad_weight = grad_bias = None

        # grad_input (M, K) = g (M, N) @ w (N, K): g e5m2 (per tensor or per row), w e4m3 per tensor.
        g_cast = None  # g in e5m2, as grad_input made it: grad_weight's cast of g is the same one
        if ctx.needs_input_grad[0]:
            grad_input, g_fp8, g_scale_inv = _Float8Matmul.apply(g, weight.t(), None, config, scaled_mm, E5M2)
            grad_input = grad_input.reshape(ctx.input_shape)
            if config.activation_scaling != "row":  # one scale per tensor: what grad_weight needs
                g_cast = (g_fp8, g_scale_inv)

        # grad_weight (N, K) = g.T (N, M) @ x (M, K): fp8 for "tensorwise", the input's dtype for "switchback".
        if ctx.needs_input_grad[1]:
            if config.grad_weight == "fp8":
                if torch.is_grad_enabled() and ctx.needs_input_grad[0]:
                    raise RuntimeError(
                        "fp8-tensorwise keeps only the fp8 copy of the input, so its weight gradient has "
                        "no derivative with respect to the input: double backward (create_graph=True) "
                        "needs recipe=\"switchback\" (\"fp8-switchback\")"
                    )
                x_fp8, x_scale_inv = saved_x
                g_fp8, g_scale_inv = g_cast or fp8_ops.to_float8(quantizable(g), E5M2, rowwise=False)
                grad_weight = fp8_ops.float8_mm(
                    g_fp8.t(), g_scale_inv, x_fp8.t(), x_scale_inv,
                    out_dtype=matmul_dtype(g.dtype), scaled_mm=scaled_mm,
                ).to(g.dtype)
            else:
                grad_weight = g.t().mm(flatten_rows(saved_x[0]))

        # grad_bias = sum of g over the rows, in high precision.
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g.sum(dim=0).to(ctx.bias_dtype)

        return grad_input, grad_weight, grad_bias, None, None, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, config, scaled_mm, input_fp8):
        input_dim, weight_dim, bias_dim = in_dims[:3]
        if weight_dim is None and bias_dim is None and config.activation_scaling == "row":
            # Rows are scaled one by one, so a batch of inputs is just more rows: one call.
            out, x_fp8, x_scale_inv = _Float8Matmul.apply(
                input.movedim(input_dim, 0), weight, bias, config, scaled_mm, input_fp8
            )
            batch = info.batch_size
            return (out, x_fp8.reshape(batch, -1, x_fp8.shape[-1]), x_scale_inv.reshape(batch, -1, 1)), (0, 0, 0)
        # One scale per tensor (or a batch of weights): each batch member is scaled on its own.
        return vmap_each_member(info, in_dims, _Float8Matmul.apply, input, weight, bias, config, scaled_mm, input_fp8)


def float8_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: Float8Config = _DEFAULT_CONFIG,
) -> torch.Tensor:
    """float8 F.linear: input (..., K) @ weight (N, K).T + bias -> (..., N) in the input's dtype.

    Args:
        input: (K,) or (..., K) float16/bfloat16/float32/float64, any strides and sizes.
        weight: (N, K) of the input's dtype (under autocast both are cast, as for F.linear).
        bias: optional (N,).
        config: the recipe and whether to simulate (see Float8Config).

    Returns:
        (..., N) tensor. A row holding inf or NaN gives NaN in its output row ("switchback") or in
        the whole output ("tensorwise": one scale for the tensor); an all-zero input gives the bias.

    Raises:
        RuntimeError: config.simulate is False and the input's device has no fp8 matmul.
    """
    input, weight, bias = linear_inputs(input, weight, bias, "float8_linear")
    scaled_mm = fp8_ops.use_scaled_mm(config.simulate, input.device)
    with autocast_off(input.device.type):  # inputs are already cast; the fp8 ops pick their own dtypes
        return _Float8Matmul.apply(input, weight, bias, config, scaled_mm, E4M3)[0]
