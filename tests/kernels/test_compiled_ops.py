"""The kernels as custom ops for torch.compile: schema and fake implementations (torch's opcheck),
and a swapped model compiled with fullgraph=True, which fails on any graph break."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.int8 import _compiled_ops
from tests.kernels._utils import DEVICE, assert_bitwise_equal


def _int8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8, device=DEVICE)


def _cases():
    x = torch.randn(19, 37, device=DEVICE, dtype=torch.bfloat16)
    a, b = _int8(21, 40), _int8(40, 33)
    a_absmax = torch.rand(21, device=DEVICE) + 0.5
    return [
        (_compiled_ops.launch_quantize_rowwise, (x,)),
        (_compiled_ops.launch_quantize_rowwise_column_sums, (x,)),
        (_compiled_ops.launch_dequantize_rowwise, (a, a_absmax, torch.bfloat16)),
        (_compiled_ops.launch_mm_dequant_rows, (x.t().contiguous().t(), _int8(37, 29), torch.rand(37, device=DEVICE))),
        (_compiled_ops.launch_quantize_tensorwise, (x, False)),
        (_compiled_ops.launch_quantize_tensorwise, (x.t(), True)),  # non-contiguous input
        (_compiled_ops.launch_quantize_colwise_transposed, (x,)),
        (_compiled_ops.launch_int8_matmul_dequant,
         (a, b, a_absmax, torch.rand(33, device=DEVICE) + 0.5, None, torch.float32)),
        (_compiled_ops.launch_int8_matmul_dequant,
         (a, _int8(33, 40).t(), a_absmax, torch.tensor(2.0, device=DEVICE),
          torch.randn(33, device=DEVICE), torch.bfloat16)),
    ]


@pytest.mark.parametrize("index", range(9))
def test_custom_op_passes_opcheck(index):
    op, args = _cases()[index]
    # Schema, fake tensor (shapes, dtypes, strides against the real kernel) and AOT dispatch.
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_custom_op_is_the_launcher():
    x = torch.randn(19, 37, device=DEVICE)
    from lowbit import kernels

    for got, want in zip(_compiled_ops.launch_quantize_rowwise(x), kernels.quantize_rowwise(x)):
        assert_bitwise_equal(got, want)


@pytest.mark.parametrize("to", ["switchback", "switchback-row", "switchback-memeff"])
def test_swapped_block_compiles_without_graph_breaks_on_the_kernels(to):
    """fullgraph=True raises on a graph break, so the kernels must trace as opaque ops."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = lowbit.swap(
        nn.Sequential(nn.Linear(40, 72), nn.GELU(), nn.Linear(72, 40)).to(DEVICE), to, filter_fn=lowbit.ALL
    )
    x = torch.randn(3, 17, 40, device=DEVICE, requires_grad=True)
    with lowbit.use_backend("triton"):
        eager = model(x)
        eager_grads = torch.autograd.grad(eager.square().sum(), [x, *model.parameters()])
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        grads = torch.autograd.grad(compiled.square().sum(), [x, *model.parameters()])
    # aot_eager runs the traced graph op by op: the same kernels, so the same bits.
    assert_bitwise_equal(compiled.detach(), eager.detach())
    for got, want in zip(grads, eager_grads):
        assert_bitwise_equal(got, want)
