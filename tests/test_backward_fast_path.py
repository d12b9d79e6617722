"""SwitchBack's plain backward takes a fast path (g's column sums from its quantization, the forward's
q(w)^T reused); a backward under create_graph takes the differentiable one (the Function again).
Both must give the same int8 arithmetic: grad_input bit for bit, grad_bias up to fp32 summation order."""

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.nn import SwitchBackLinear
from tests.kernels._utils import DEVICE

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

# switchback-memeff is not here: it refuses create_graph (it keeps only int8 x; tests/test_dropin.py).
VARIANTS = {
    "switchback": {},
    "switchback-row": {"weight_quant": "row"},
    "llm-int8": {"weight_quant": "row", "grad_weight": "int8"},
}


def _grads(layer, x, g, create_graph):
    x = x.clone().requires_grad_()
    out = layer(x)
    grads = torch.autograd.grad(out, (x, layer.weight, layer.bias), g, create_graph=create_graph)
    return [t.detach() for t in grads]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(32, 32), (24, 40)], ids=["square", "wide"])  # a transposed q(w) fits a square one
@pytest.mark.parametrize("name", list(VARIANTS))
def test_fast_and_differentiable_backward_agree(name, shape, backend):
    torch.manual_seed(0)
    layer = SwitchBackLinear(*shape, **VARIANTS[name], device=DEVICE)
    x, g = torch.randn(13, shape[0], device=DEVICE), torch.randn(13, shape[1], device=DEVICE)
    with lowbit.use_backend(backend):
        fast = _grads(layer, x, g, create_graph=False)
        slow = _grads(layer, x, g, create_graph=True)
    assert torch.equal(fast[0], slow[0])  # grad_input
    assert torch.equal(fast[1], slow[1])  # grad_weight
    torch.testing.assert_close(fast[2], slow[2], rtol=1e-6, atol=1e-6)  # grad_bias


def test_tensorwise_weight_is_quantized_once_per_step(monkeypatch):
    calls = []
    for name in ("launch_quantize_tensorwise", "launch_quantize_tensorwise_and_transpose"):
        launch = getattr(kernels, name)

        def record(*args, _launch=launch, _name=name, **kwargs):
            calls.append(_name)
            return _launch(*args, **kwargs)

        monkeypatch.setattr(kernels, name, record)
    layer = SwitchBackLinear(32, 32, device=DEVICE)
    x = torch.randn(9, 32, device=DEVICE, requires_grad=True)
    with lowbit.use_backend("triton"):
        layer(x).square().sum().backward()
        assert calls == ["launch_quantize_tensorwise_and_transpose"]
        calls.clear()
        with torch.no_grad():  # inference: no transposed copy
            layer(x)
        assert calls == ["launch_quantize_tensorwise"]


@pytest.mark.parametrize("name", ["switchback", "switchback-row", "switchback-memeff", "fp8-tensorwise"])
def test_backward_fills_no_zero_gradients_for_the_saved_low_precision_outputs(name):
    """The Functions' int8 / fp8 side outputs carry no gradient; autograd must not fill zeros for them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fills(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name.split("::")[-1] in ("zeros", "zeros_like", "fill_", "zero_", "new_zeros"):
                Fills.seen.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    model = torch.nn.Sequential(torch.nn.Linear(32, 48))
    lowbit.swap(model, name, filter_fn=lowbit.ALL, **({"simulate": True} if name.startswith("fp8") else {}))
    out = model(torch.randn(9, 32, requires_grad=True))
    with Fills():
        out.backward(torch.randn_like(out))
    assert Fills.seen == []
