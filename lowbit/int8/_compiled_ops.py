"""The Triton launchers of `lowbit.kernels` as torch custom ops, used while torch.compile traces.

Dynamo cannot always trace into an autotuned launcher (config pruning reads the device, the
launcher allocates its outputs), and a graph break per quantization would split every layer's
graph. As custom ops with fake (shape-only) implementations, the kernels are opaque nodes that
Inductor calls as they are. Eager code calls the launchers directly and skips the custom-op
dispatch overhead; `lowbit.int8.ops` picks one or the other, after checking the inputs (the
`launch_*` functions do not check them again).

The fake implementations describe the launchers' outputs: new, contiguous tensors.
"""

from __future__ import annotations

import torch


def _kernels():
    from lowbit import kernels  # imported on first use: the package imports without Triton

    return kernels


@torch.library.custom_op("lowbit::quantize_rowwise", mutates_args=())
def launch_quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().launch_quantize_rowwise(x)


@launch_quantize_rowwise.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("lowbit::quantize_rowwise_column_sums", mutates_args=())
def launch_quantize_rowwise_column_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().launch_quantize_rowwise_column_sums(x)


@launch_quantize_rowwise_column_sums.register_fake
def _(x):
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty(x.shape[0], dtype=torch.float32),
        x.new_empty(x.shape[1], dtype=torch.float32),
    )


@torch.library.custom_op("lowbit::quantize_tensorwise", mutates_args=())
def launch_quantize_tensorwise(x: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().launch_quantize_tensorwise(x, transpose=transpose)


@launch_quantize_tensorwise.register_fake
def _(x, transpose):
    shape = (x.shape[1], x.shape[0]) if transpose else x.shape
    return x.new_empty(shape, dtype=torch.int8), x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("lowbit::quantize_tensorwise_and_transpose", mutates_args=())
def launch_quantize_tensorwise_and_transpose(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().launch_quantize_tensorwise_and_transpose(x)


@launch_quantize_tensorwise_and_transpose.register_fake
def _(x):
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty((x.shape[1], x.shape[0]), dtype=torch.int8),
        x.new_empty((), dtype=torch.float32),
    )


@torch.library.custom_op("lowbit::quantize_colwise_transposed", mutates_args=())
def launch_quantize_colwise_transposed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().launch_quantize_colwise_transposed(x)


@launch_quantize_colwise_transposed.register_fake
def _(x):
    return x.new_empty((x.shape[1], x.shape[0]), dtype=torch.int8), x.new_empty(x.shape[1], dtype=torch.float32)


@torch.library.custom_op("lowbit::int8_matmul_dequant", mutates_args=())
def launch_int8_matmul_dequant(
    a: torch.Tensor,
    b: torch.Tensor,
    a_absmax: torch.Tensor,
    b_absmax: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _kernels().launch_int8_matmul_dequant(a, b, a_absmax, b_absmax, bias=bias, out_dtype=out_dtype)


@launch_int8_matmul_dequant.register_fake
def _(a, b, a_absmax, b_absmax, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


@torch.library.custom_op("lowbit::dequantize_rowwise", mutates_args=())
def launch_dequantize_rowwise(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _kernels().launch_dequantize_rowwise(q, absmax, dtype)


@launch_dequantize_rowwise.register_fake
def _(q, absmax, dtype):
    return q.new_empty(q.shape, dtype=dtype)


@torch.library.custom_op("lowbit::mm_dequant_rows", mutates_args=())
def launch_mm_dequant_rows(a: torch.Tensor, q: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    return _kernels().launch_mm_dequant_rows(a, q, absmax)


@launch_mm_dequant_rows.register_fake
def _(a, q, absmax):
    return a.new_empty((a.shape[0], q.shape[1]))
