"""SwitchBack as autograd Functions: which matmul runs in int8, which in 16-bit, and what is saved.

Paper (Wortsman, Dettmers et al. 2023, section 2.2): of a linear layer's three matmuls, the forward
x @ w.T and grad_input g @ w have a small inner dimension (the layer's width) and run in int8 with
row-wise x and g; the weight gradient g.T @ x sums over batch x sequence, where int8 error would
pile up, so it "switches back" to the input's 16-bit dtype.
"""

from __future__ import annotations

import torch

from lowbit import ops
from lowbit._inputs import (
    autocast_linear_inputs,
    autocast_off,
    check_linear_inputs,
    needs_autograd,
    unflatten_output,
)
from lowbit.config import SwitchBackConfig

__all__ = ["switchback_linear", "Int8WeightCache"]


def _quantize_weight(weight: torch.Tensor, config: SwitchBackConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's int8 weight (N, K): one scale, or one per output row."""
    if config.weight_quant == "tensor":
        return ops.quantize_tensorwise(weight)
    return ops.quantize_rowwise(weight)


def _quantize_weight_t(weight: torch.Tensor, config: SwitchBackConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_input's int8 weight, transposed to (K, N) so the int8 GEMM reads it K-major.

    "row" scales it per input column here: grad_input sums over the output rows, so a row scale
    could not be taken out of that sum.
    """
    if config.weight_quant == "tensor":
        return ops.quantize_tensorwise(weight, transpose=True)
    return ops.quantize_colwise_transposed(weight)


_DEFAULT_CONFIG = SwitchBackConfig()


class _SwitchBackMatmul(torch.autograd.Function):
    """out (M, N) = x (M, K) @ weight (N, K).T + bias, int8 forward and grad_input, 16-bit grad_weight."""

    @staticmethod
    def forward(ctx, input, weight, bias, config: SwitchBackConfig):
        # Flattened here rather than by the caller, so the output is a fresh tensor, as nn.Linear's is
        # (an output that is a view breaks in-place ops after the layer, e.g. FSDP2's hooks).
        ctx.input_shape = input.shape
        x = input.reshape(-1, input.shape[-1])
        x_int8, x_absmax = ops.quantize_rowwise(x)
        w_int8, w_absmax = _quantize_weight(weight, config)
        out = ops.int8_matmul_dequant(x_int8, w_int8.t(), x_absmax, w_absmax, bias=bias, out_dtype=x.dtype)

        ctx.config = config
        ctx.bias_dtype = None if bias is None else bias.dtype
        # x is needed only for grad_weight: keep it, or its int8 copy, only then.
        if not ctx.needs_input_grad[1]:
            ctx.save_for_backward(weight)
        elif config.mem_efficient:
            ctx.save_for_backward(weight, x_int8, x_absmax)
        else:
            ctx.save_for_backward(weight, x)
        return unflatten_output(out, input)

    @staticmethod
    def backward(ctx, grad_output):
        weight, *saved_x = ctx.saved_tensors
        grad_output = grad_output.reshape(-1, grad_output.shape[-1])
        config = ctx.config
        grad_input = grad_weight = grad_bias = None

        # grad_input = g @ w, in int8: g row-wise, w tensor-wise (or column-wise for "row").
        if ctx.needs_input_grad[0]:
            g_int8, g_absmax = ops.quantize_rowwise(grad_output)
            w_t_int8, w_t_absmax = _quantize_weight_t(weight, config)
            grad_input = ops.int8_matmul_dequant(
                g_int8, w_t_int8.t(), g_absmax, w_t_absmax, out_dtype=grad_output.dtype
            ).view(ctx.input_shape)

        # grad_weight = g.T @ x, in the input's 16-bit dtype (mem_efficient: against dequantized x).
        if ctx.needs_input_grad[1]:
            x = ops.dequantize_rowwise(*saved_x, grad_output.dtype) if config.mem_efficient else saved_x[0]
            grad_weight = grad_output.t().mm(x)

        # grad_bias = sum of g over the rows.
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(dim=0).to(ctx.bias_dtype)

        return grad_input, grad_weight, grad_bias, None


class Int8WeightCache:
    """The int8 copy of a layer's own weight for inference-only forwards, kept while it is current.

    The key holds the Parameter's storage, version counter (bumped by every in-place update through
    the Parameter: optimizer steps, load_state_dict) and the dtype it is used in (autocast casts a
    fresh copy every call, so the copy itself could never be the key). Writes through `.data` bypass
    the version counter: the layer clears its cache whenever train()/eval() is called.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def usable_for(self, param: torch.Tensor) -> bool:
        # Compiled graphs do their own caching (and Dynamo cannot trace is_inference(), hence the
        # order); inference tensors have no version counter.
        return not torch.compiler.is_compiling() and not param.is_inference()

    def get(
        self, param: torch.Tensor, dtype: torch.dtype, config: SwitchBackConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (param.data_ptr(), param.device, param._version, dtype, config.weight_quant)
        if key != self._key:
            self._value = _quantize_weight(param.detach().to(dtype), config)
            self._key = key
        return self._value

    def clear(self) -> None:
        self._key = self._value = None


def switchback_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: SwitchBackConfig = _DEFAULT_CONFIG,
    weight_cache: Int8WeightCache | None = None,
) -> torch.Tensor:
    """SwitchBack's F.linear: input (..., K) @ weight (N, K).T + bias -> (..., N) in the input's dtype.

    Args:
        input: (..., K) float32/float16/bfloat16, any strides, at least 2-D.
        weight: (N, K) of the input's dtype (under autocast both are cast, as for F.linear).
        bias: optional (N,).
        config: weight quantization and memory options.
        weight_cache: the layer's cache for `weight` (its own Parameter), used only when no
            gradient is needed, to quantize the weight once.

    Returns:
        (..., N) tensor. A row of the input holding inf or NaN gives NaN in that output row only;
        an all-zero row gives the bias.
    """
    param = weight
    input, weight, bias = autocast_linear_inputs(input, weight, bias)
    check_linear_inputs(input, weight, bias, "switchback_linear")
    with autocast_off(input.device.type):  # inputs are already cast; the int8 ops pick their own dtypes
        if needs_autograd(input, weight, bias):
            return _SwitchBackMatmul.apply(input, weight, bias, config)
        # Inference: no autograd graph, and the weight quantized once while it stays unchanged.
        if weight_cache is not None and weight_cache.usable_for(param):
            w_int8, w_absmax = weight_cache.get(param, weight.dtype, config)
        else:
            w_int8, w_absmax = _quantize_weight(weight, config)
        x_int8, x_absmax = ops.quantize_rowwise(input.reshape(-1, input.shape[-1]))
        out = ops.int8_matmul_dequant(x_int8, w_int8.t(), x_absmax, w_absmax, bias=bias, out_dtype=input.dtype)
        return unflatten_output(out, input)
