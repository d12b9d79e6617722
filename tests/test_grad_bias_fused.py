"""SwitchBack's grad_bias comes out of grad_input's quantization of g (one read of g), except where
the backward must stay differentiable; either way it is the column sum of g."""

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.nn import SwitchBackLinear
from tests.kernels._utils import DEVICE

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    launch = kernels.launch_quantize_rowwise_column_sums

    def record(x):
        calls.append(tuple(x.shape))
        return launch(x)

    monkeypatch.setattr(kernels, "launch_quantize_rowwise_column_sums", record)
    return calls


@pytest.mark.parametrize("weight_quant", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_bias_is_fused_and_is_the_column_sum_of_g(weight_quant, dtype, fused_calls):
    torch.manual_seed(0)
    layer = SwitchBackLinear(48, 70, weight_quant=weight_quant, dtype=dtype, device=DEVICE)
    x = torch.randn(3, 45, 48, dtype=dtype, device=DEVICE, requires_grad=True)
    g = torch.randn(3, 45, 70, dtype=dtype, device=DEVICE)
    with lowbit.use_backend("triton"):
        layer(x).backward(g)
    assert fused_calls == [(135, 70)]  # g, flattened, once
    exact = g.cpu().double().reshape(-1, 70).sum(dim=0)
    assert layer.bias.grad.dtype == dtype
    tolerance = 2.0**-8 if dtype == torch.bfloat16 else 1e-5  # the result's own rounding
    torch.testing.assert_close(layer.bias.grad.cpu().double(), exact, rtol=tolerance, atol=tolerance)


def test_no_fusion_without_grad_input(fused_calls):
    layer = SwitchBackLinear(16, 24, device=DEVICE)
    x = torch.randn(7, 16, device=DEVICE)  # no grad: grad_input (and g's quantization) is not needed
    with lowbit.use_backend("triton"):
        layer(x).sum().backward()
    assert fused_calls == []
    torch.testing.assert_close(layer.bias.grad.cpu(), torch.full((24,), 7.0))


def test_double_backward_differentiates_grad_bias(fused_calls):
    """Under create_graph the sums are not taken in the kernel: grad_bias must carry a graph to x."""
    torch.manual_seed(1)
    layer = SwitchBackLinear(16, 24, device=DEVICE)
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    with lowbit.use_backend("triton"):
        out = layer(x)
        (grad_bias,) = torch.autograd.grad(out.square().sum(), layer.bias, create_graph=True)
        assert fused_calls == [] and grad_bias.requires_grad
        (grad_x,) = torch.autograd.grad(grad_bias.sum(), x)  # a plain backward through out: may fuse
    # grad_bias = 2 * sum of out over rows, so d(sum grad_bias)/dx = 2 * (row of ones) @ W = 2 * W.sum(0)
    want = (2 * layer.weight.detach().sum(dim=0)).expand(5, 16)
    assert torch.nn.functional.cosine_similarity(grad_x.flatten(), want.flatten(), dim=0) > 0.999
