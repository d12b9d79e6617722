"""Block-scaled linear as an autograd Function: forward and grad-input in the format, grad-weight
in high precision (SwitchBack's split) unless `grad_weight="format"`.

grad_input = g @ w is this Function with w.T as its weight: the Function blocks along the last dim
of its input and of its weight, which for g (M, N) and w.T (K, N) is N, that GEMM's reduction
dimension. The backward is then differentiable and batched by vmap, as for float8.
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
from lowbit.mx import ops as block_ops
from lowbit.mx.config import BlockConfig

__all__ = ["block_linear"]

_DEFAULT_CONFIG = BlockConfig()


class _BlockMatmul(torch.autograd.Function):
    """out (..., N) = input (..., K) @ weight (N, K).T + bias, both blocked along K in config.format."""

    @staticmethod
    def forward(input, weight, bias, config: BlockConfig):
        x = flatten_rows(input)
        out = block_ops.block_mm(
            quantizable(x), quantizable(weight), config.format, bias=bias, out_dtype=matmul_dtype(x.dtype)
        )
        return unflatten_output(out.to(x.dtype), input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, config = inputs
        ctx.config = config
        ctx.input_shape = input.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        # The input is needed for grad_weight only; it is kept in its own dtype either way (the
        # simulation quantizes it again in backward, should grad_weight be "format").
        ctx.save_for_backward(weight, input if ctx.needs_input_grad[1] else None)

    @staticmethod
    def backward(ctx, grad_output):
        weight, input = ctx.saved_tensors
        g = flatten_rows(grad_output)
        config = ctx.config
        grad_input = grad_weight = grad_bias = None

        if ctx.needs_input_grad[0]:
            grad_input = _BlockMatmul.apply(g, weight.t(), None, config).reshape(ctx.input_shape)

        if ctx.needs_input_grad[1]:
            x = flatten_rows(input)
            if config.grad_weight == "format":
                if torch.is_grad_enabled() and ctx.needs_input_grad[0]:
                    raise RuntimeError(
                        f"{config.format} with grad_weight=\"format\" has no derivative of its weight gradient: "
                        "double backward (create_graph=True) needs grad_weight=\"high\" (the default)"
                    )
                # g.T (N, M) @ x (M, K): the reduction runs over the batch, so both are blocked along M.
                grad_weight = block_ops.block_mm(
                    quantizable(g.t()), quantizable(x.t()), config.format,
                    out_dtype=matmul_dtype(g.dtype), b_is_weight=False,
                ).to(g.dtype)
            else:
                grad_weight = g.t().mm(x)

        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g.sum(dim=0).to(ctx.bias_dtype)

        return grad_input, grad_weight, grad_bias, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, config):
        # Each batch member on its own: nvfp4's tensor scale and fp8-blockwise's weight blocks are
        # per tensor, so a batch is not just more rows.
        return vmap_each_member(info, in_dims, _BlockMatmul.apply, input, weight, bias, config)


def block_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: BlockConfig = _DEFAULT_CONFIG,
) -> torch.Tensor:
    """Block-scaled F.linear: input (..., K) @ weight (N, K).T + bias -> (..., N) in the input's dtype.

    Args:
        input: (K,) or (..., K) float16/bfloat16/float32/float64, any strides and sizes.
        weight: (N, K) of the input's dtype (under autocast both are cast, as for F.linear).
        bias: optional (N,).
        config: the format and the weight gradient's precision (see BlockConfig).

    Returns:
        (..., N) tensor, simulated in plain torch (lowbit.mx.ops gives the rules). A block holding
        inf or NaN gives NaN in the outputs that read it (for nvfp4, every output: one tensor scale).
    """
    input, weight, bias = linear_inputs(input, weight, bias, "block_linear")
    note = block_ops.simulation_note(config.format, input.device)
    if note is not None:
        block_ops.note_simulated(note)
    with autocast_off(input.device.type):
        return _BlockMatmul.apply(input, weight, bias, config)
