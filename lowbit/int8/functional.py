"""SwitchBack as an autograd Function: which matmul runs in int8, which in 16-bit, and what is saved.

Paper (Wortsman, Dettmers et al. 2023, section 2.2): of a linear layer's three matmuls, the forward
x @ w.T and grad_input g @ w have a small inner dimension (the layer's width) and run in int8 with
row-wise x and g; the weight gradient g.T @ x sums over batch x sequence, where int8 error would
pile up, so it "switches back" to the input's 16-bit dtype.

grad_input is computed by the same Function, with w.T as its weight: the backward is then itself
made of differentiable pieces (double backward gives SwitchBack's second-order gradients) and of
pieces that torch.func's vmap knows how to batch.
"""

from __future__ import annotations

import dataclasses

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
from lowbit.int8 import ops
from lowbit.int8.config import SwitchBackConfig

__all__ = ["switchback_linear", "FrozenInt8Weight"]

_DEFAULT_CONFIG = SwitchBackConfig()


def quantize_weight(weight: torch.Tensor, config: SwitchBackConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 weight (N, K) of x @ w.T: one scale, or one per output row ("row").

    For grad_input the Function is called with w.T (K, N) as its weight, so "row" then scales per
    input column of w, the only choice that can be taken out of grad_input's sum over output rows.
    """
    weight = quantizable(weight)
    if config.weight_quant == "tensor":
        return ops.quantize_tensorwise(weight)
    return ops.quantize_rowwise(weight)


class FrozenInt8Weight:
    """The int8 copy of one Parameter, made by `SwitchBackLinear.freeze_weight()` for inference.

    Invariant: the copy is used only for that same Parameter object, in the same dtype, while its
    version counter (bumped by optimizer steps, `copy_`, `load_state_dict`) and its storage (changed
    by `param.data = ...`, as in `vector_to_parameters`) are the ones it was made from. The old
    storage is held, so no new tensor can take its address. `functional_call`, `assign=True` loads
    and `torch.func` pass other tensor objects and never see it. The one write it cannot see is an
    in-place write to `param.data` (`.data.copy_`): call `freeze_weight()` again after one.
    """

    def __init__(self, param: torch.Tensor, config: SwitchBackConfig) -> None:
        self.param = param
        self.config = config
        self._storage = param.untyped_storage()
        self._version = param._version
        self._by_dtype: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def is_current(self, param: torch.Tensor) -> bool:
        return (
            param is self.param
            and param._version == self._version
            and param.untyped_storage().data_ptr() == self._storage.data_ptr()
        )

    def lookup(self, param: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The int8 weight for `weight` (param itself, or its autocast copy), or None if not current."""
        if torch.compiler.is_compiling() or not self.is_current(param):
            return None
        if weight.dtype not in self._by_dtype:
            with torch.no_grad():
                self._by_dtype[weight.dtype] = quantize_weight(weight.detach(), self.config)
        return self._by_dtype[weight.dtype]


_PER_FEATURE = SwitchBackConfig(weight_quant="row")
# Tokens per int8 grad_weight chunk: the most an int32 sum of int8 products can take.
GRAD_WEIGHT_CHUNK = ops.MAX_INNER_DIM


def _int8_grad_weight(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g.T (N, M) @ x (M, K) in int8, g.T and x scaled per feature over the tokens (LLM.int8()).

    The Function itself, with g.T as the input and x.T as a row-scaled weight, so it stays
    differentiable; in chunks of at most MAX_INNER_DIM tokens (each with its own scales), so the
    int32 sums cannot overflow.
    """
    chunk = GRAD_WEIGHT_CHUNK
    parts = [
        _SwitchBackMatmul.apply(g[i : i + chunk].t(), x[i : i + chunk].t(), None, _PER_FEATURE, None, False)[0]
        for i in range(0, max(g.shape[0], 1), chunk)
    ]
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(dim=0)


def _int8_linear(x, weight, bias, config, frozen_weight, *, column_sums=False, keep_weight_t=False):
    """x (M, K) @ weight (N, K).T + bias in int8 -> (out (M, N) in matmul_dtype, x_int8, x_absmax,
    x's fp32 column sums (K,) if column_sums else None, (q(w)^T, its scale) if keep_weight_t else None).

    keep_weight_t (tensor-wise weight only): q(w)^T is written in the same pass as q(w); grad_input's
    GEMM takes it as is, so the weight is quantized once per forward call, not again in backward
    (a layer called n times before backward keeps n copies: N * K int8 bytes each).
    """
    xq = quantizable(x)
    if column_sums:
        x_int8, x_absmax, x_sums = ops.quantize_rowwise_column_sums(xq)
    else:
        (x_int8, x_absmax), x_sums = ops.quantize_rowwise(xq), None
    weight_t = None
    if frozen_weight is not None:
        w_int8, w_absmax = frozen_weight
    elif keep_weight_t:
        w_int8, w_int8_t, w_absmax = ops.quantize_tensorwise_and_transpose(quantizable(weight))
        weight_t = (w_int8_t, w_absmax)
    else:
        w_int8, w_absmax = quantize_weight(weight, config)
    # A float64 bias is added in fp32 like the rest of the epilogue (the kernels read fp32/16-bit).
    bias = None if bias is None else quantizable(bias)
    out = ops.int8_matmul_dequant(x_int8, w_int8.t(), x_absmax, w_absmax, bias=bias, out_dtype=matmul_dtype(x.dtype))
    return out, x_int8, x_absmax, x_sums, weight_t


def _plain(t: torch.Tensor) -> bool:
    """Not a torch.func wrapper (vmap's batched or grad's tracked tensors take the Function's path).

    Under torch.compile the traced backward holds no such wrappers (and dynamo cannot trace the test).
    """
    return torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(t)


class _SwitchBackMatmul(torch.autograd.Function):
    """(out (..., N), x_int8, x_absmax, w_int8_t, w_absmax) for out = input (..., K) @ weight (N, K).T + bias.

    int8 forward and grad_input, high-precision grad_weight. x_int8 / x_absmax (the row-wise int8
    input) are returned for mem_efficient's backward, w_int8_t / w_absmax (the tensor-wise int8
    weight, transposed; empty unless kept) for grad_input's; they carry no gradient.
    """

    @staticmethod
    def forward(input, weight, bias, config: SwitchBackConfig, frozen_weight, grad_enabled: bool):
        # Only a backward that computes grad_input reads q(w)^T. Grad mode is off in here, so the
        # caller says whether it was on (no_grad inference writes no transposed copy).
        keep = grad_enabled and frozen_weight is None and config.weight_quant == "tensor" and input.requires_grad
        out, x_int8, x_absmax, _, weight_t = _int8_linear(
            flatten_rows(input), weight, bias, config, frozen_weight, keep_weight_t=keep
        )
        if weight_t is None:  # outputs must be tensors: empty placeholders
            weight_t = (weight.new_empty(0, dtype=torch.int8), weight.new_empty(0, dtype=torch.float32))
        # Flattened here rather than by the caller, so the output is a fresh tensor, as nn.Linear's is
        # (an output that is a view breaks in-place ops after the layer, e.g. FSDP2's hooks).
        return unflatten_output(out.to(input.dtype), input), x_int8, x_absmax, *weight_t

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, config, _, _ = inputs
        _, x_int8, x_absmax, w_int8_t, w_absmax = output
        ctx.mark_non_differentiable(x_int8, x_absmax, w_int8_t, w_absmax)
        # Their gradients are never read: no zero tensors for them (autograd would fill four per call).
        ctx.set_materialize_grads(False)
        ctx.config = config
        ctx.input_shape = input.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        # q(w)^T, if forward wrote it (2-D, not the 1-D placeholder) and grad_input will read it.
        kept = w_int8_t.dim() == 2 and ctx.needs_input_grad[0]
        weight_t = (w_int8_t, w_absmax) if kept else (None, None)
        # x is needed only for grad_weight: keep it, or its int8 copy, only then.
        if not ctx.needs_input_grad[1]:
            ctx.save_for_backward(weight, *weight_t)
        elif config.mem_efficient:
            ctx.save_for_backward(weight, *weight_t, x_int8, x_absmax)
        else:
            ctx.save_for_backward(weight, *weight_t, input)

    @staticmethod
    def backward(ctx, grad_output, _grad_x_int8, _grad_x_absmax, _grad_w_int8_t, _grad_w_absmax):
        if grad_output is None:  # (not materialized: nothing reached the output)
            return None, None, None, None, None, None
        weight, w_int8_t, w_absmax, *saved_x = ctx.saved_tensors
        config = ctx.config
        g = flatten_rows(grad_output)
        grad_input = grad_weight = grad_bias = None

        # grad_input = g @ w, in int8: g row-wise, w tensor-wise (or per input column for "row").
        # grad_bias = the column sums of g, taken from that same read of g, and the forward's q(w)^T
        # reused, unless this backward is itself differentiated (create_graph, torch.func): then
        # grad_input is this Function again and grad_bias g.sum, both differentiable.
        wants_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        g_sums = None
        if ctx.needs_input_grad[0]:
            grad_config = dataclasses.replace(config, mem_efficient=False)
            if not torch.is_grad_enabled() and _plain(g):
                weight_t = (w_int8_t, w_absmax) if w_int8_t is not None else None  # = quantize_weight(w.T)
                # (float64 keeps its float64 g.sum: the fused sums are fp32.)
                sums = wants_bias and g.dtype != torch.float64
                grad_input, _, _, g_sums, _ = _int8_linear(g, weight.t(), None, grad_config, weight_t, column_sums=sums)
                grad_input = grad_input.to(g.dtype)
            else:
                grad_input = _SwitchBackMatmul.apply(g, weight.t(), None, grad_config, None, True)[0]
            grad_input = grad_input.reshape(ctx.input_shape)

        # grad_weight = g.T @ x, in the input's 16-bit dtype (mem_efficient: against dequantized x).
        if ctx.needs_input_grad[1]:
            if config.mem_efficient:
                if torch.is_grad_enabled() and ctx.needs_input_grad[0]:
                    raise RuntimeError(
                        "switchback-memeff keeps only the int8 copy of the input, so its weight gradient "
                        "has no derivative with respect to the input: double backward (create_graph=True) "
                        "needs weight_quant without mem_efficient (\"switchback\" or \"switchback-row\")"
                    )
                x_int8, x_absmax = saved_x
                if config.grad_weight == "int8":
                    grad_weight = _int8_grad_weight(g, ops.dequantize_rowwise(x_int8, x_absmax, g.dtype))
                else:  # g.T @ x with x dequantized inside the GEMM (never written back in 16-bit)
                    grad_weight = ops.mm_dequantized(g.t(), x_int8, x_absmax)
            else:
                x = flatten_rows(saved_x[0])
                grad_weight = _int8_grad_weight(g, x) if config.grad_weight == "int8" else g.t().mm(x)

        if wants_bias:
            grad_bias = (g_sums if g_sums is not None else g.sum(dim=0)).to(ctx.bias_dtype)

        return grad_input, grad_weight, grad_bias, None, None, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, config, frozen_weight, grad_enabled):
        input_dim, weight_dim, bias_dim = in_dims[:3]
        if weight_dim is None and bias_dim is None:
            # Rows are quantized one by one, so a batch of inputs is just more rows: one call.
            x = input.movedim(input_dim, 0)
            out, x_int8, x_absmax, w_int8_t, w_absmax = _SwitchBackMatmul.apply(
                x, weight, bias, config, frozen_weight, grad_enabled
            )
            batch = info.batch_size
            x_int8, x_absmax = x_int8.reshape(batch, -1, x_int8.shape[-1]), x_absmax.reshape(batch, -1)
            return (out, x_int8, x_absmax, w_int8_t, w_absmax), (0, 0, 0, None, None)  # one weight: unbatched
        # A batch of weights (model ensembles): each member is its own layer, quantized on its own.
        return vmap_each_member(info, in_dims, _SwitchBackMatmul.apply, input, weight, bias, config, None, grad_enabled)


def switchback_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: SwitchBackConfig = _DEFAULT_CONFIG,
    frozen_weight: FrozenInt8Weight | None = None,
) -> torch.Tensor:
    """SwitchBack's F.linear: input (..., K) @ weight (N, K).T + bias -> (..., N) in the input's dtype.

    Args:
        input: (K,) or (..., K) float16/bfloat16/float32/float64, any strides and sizes.
        weight: (N, K) of the input's dtype (under autocast both are cast, as for F.linear).
        bias: optional (N,).
        config: weight quantization and memory options.
        frozen_weight: an int8 copy of `weight` made by `freeze_weight()`, used only while current.

    Returns:
        (..., N) tensor. A row of the input holding inf or NaN gives NaN in that output row only;
        an all-zero row gives the bias.
    """
    param = weight
    input, weight, bias = linear_inputs(input, weight, bias, "switchback_linear")
    w_frozen = frozen_weight.lookup(param, weight) if frozen_weight is not None else None
    with autocast_off(input.device.type):  # inputs are already cast; the int8 ops pick their own dtypes
        return _SwitchBackMatmul.apply(input, weight, bias, config, w_frozen, torch.is_grad_enabled())[0]
