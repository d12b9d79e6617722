"""The paper's LLM.int8()-style baseline: a linear layer with all three matmuls in int8.

Wortsman, Dettmers et al. (2023), section 2.2, compare SwitchBack with a baseline that also runs the
weight gradient g.T @ x in int8. That matmul's inner dimension is batch x sequence, so the
quantization error of many more products accumulates in each output; SwitchBack keeps it in 16-bit.
Here, with lowbit's int8 ops (Triton on CUDA, the torch reference elsewhere):

    output      = x @ w.T   x row-wise (per token),          w row-wise (per output feature)
    grad_input  = g @ w     g row-wise (per token),          w column-wise (per input feature)
    grad_weight = g.T @ x   g.T row-wise (per output feature), x column-wise (per input feature)

No outlier decomposition (LLM.int8()'s threshold = 0), as in the paper's baseline.

bitsandbytes' Linear8bitLt (0.50) is not this baseline: it runs grad_input in 16-bit against the
dequantized weight, and its Int8Params change the state_dict, so `lowbit.swap` could not share
parameters with it. `LLMInt8Linear` is a `lowbit.nn.LowbitLinear`, so `lowbit.swap(model,
LLMInt8Linear, ...)` works, nn.MultiheadAttention included.
"""

from __future__ import annotations

import torch

from lowbit.int8 import ops
from lowbit.nn import LowbitLinear


def _int8_matmul_t(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a.T @ b for a (M, N), b (M, K): a.T row-wise, b column-wise, both over M; in int8, chunked over M.

    A chunk keeps the int32 accumulator from overflowing when M (tokens) exceeds ops.MAX_INNER_DIM;
    each chunk has its own scales, as a kernel tiling M would.
    """
    out = None
    for start in range(0, a.shape[0], ops.MAX_INNER_DIM):
        a_chunk, b_chunk = a[start : start + ops.MAX_INNER_DIM], b[start : start + ops.MAX_INNER_DIM]
        a_t_int8, a_t_absmax = ops.quantize_colwise_transposed(a_chunk)  # (N, M): rows of a.T
        b_t_int8, b_absmax = ops.quantize_colwise_transposed(b_chunk)  # (K, M): columns of b
        part = ops.int8_matmul_dequant(a_t_int8, b_t_int8.t(), a_t_absmax, b_absmax, out_dtype=torch.float32)
        out = part if out is None else out + part
    return out.to(out_dtype)


class _LLMInt8Matmul(torch.autograd.Function):
    """out (M, N) = x (M, K) @ weight (N, K).T + bias with int8 forward, grad_input and grad_weight."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x_int8, x_absmax = ops.quantize_rowwise(x)
        w_int8, w_absmax = ops.quantize_rowwise(weight)
        out = ops.int8_matmul_dequant(x_int8, w_int8.t(), x_absmax, w_absmax, bias=bias, out_dtype=x.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None

        # grad_input = g @ w: g row-wise, w column-wise (scales along the summed output dimension
        # could not be factored out of the sum).
        if ctx.needs_input_grad[0]:
            g_int8, g_absmax = ops.quantize_rowwise(grad_output)
            w_t_int8, w_t_absmax = ops.quantize_colwise_transposed(weight)
            grad_input = ops.int8_matmul_dequant(
                g_int8, w_t_int8.t(), g_absmax, w_t_absmax, out_dtype=grad_output.dtype
            )

        # grad_weight = g.T @ x, in int8 too: the matmul SwitchBack keeps in 16-bit.
        if ctx.needs_input_grad[1]:
            grad_weight = _int8_matmul_t(grad_output, x, weight.dtype)

        # grad_bias = sum of g over the rows.
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(dim=0).to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias


class LLMInt8Linear(LowbitLinear):
    """nn.Linear with int8 forward, grad_input and grad_weight (the paper's LLM.int8() baseline)."""

    def linear(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        device_type = input.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            input, weight = input.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        x = input.reshape(-1, input.shape[-1])
        with torch.autocast(device_type, enabled=False):
            out = _LLMInt8Matmul.apply(x, weight, bias)
        return out.reshape(*input.shape[:-1], weight.shape[0])
