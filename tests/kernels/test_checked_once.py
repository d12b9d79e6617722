"""Inputs are checked once, at lowbit.int8.ops' public entry: the layers reach the kernels through
the unchecked launch_* entries, and the checked entries of lowbit.kernels refuse what ops refuses."""

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.int8 import ops
from tests.kernels._utils import DEVICE

CHECKED = ("quantize_rowwise", "quantize_tensorwise", "quantize_colwise_transposed", "int8_matmul_dequant")


@pytest.mark.parametrize("to", ["switchback", "switchback-row", "switchback-memeff", "llm-int8"])
def test_layers_call_only_the_unchecked_launchers(to, monkeypatch):
    launched = []
    for name in CHECKED:
        launch = getattr(kernels, f"launch_{name}")

        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"the checked entry kernels.{_name} ran: its checks ran twice")

        def record(*args, _launch=launch, _name=name, **kwargs):
            launched.append(_name)
            return _launch(*args, **kwargs)

        monkeypatch.setattr(kernels, name, refuse)
        monkeypatch.setattr(kernels, f"launch_{name}", record)
    model = torch.nn.Sequential(torch.nn.Linear(33, 17, device=DEVICE))
    lowbit.swap(model, to, filter_fn=lowbit.ALL)
    x = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    with lowbit.use_backend("triton"):
        model(x).sum().backward()
    assert "int8_matmul_dequant" in launched and any(n.startswith("quantize") for n in launched)


@pytest.mark.parametrize("entry", [ops, kernels], ids=["ops", "kernels"])
def test_both_entries_refuse_the_same_inputs(entry):
    a = torch.zeros(4, 8, dtype=torch.int8, device=DEVICE)
    b = torch.zeros(8, 3, dtype=torch.int8, device=DEVICE)
    ones = torch.ones(4, device=DEVICE)
    with lowbit.use_backend("triton"):
        with pytest.raises(TypeError, match="scales and bias must be"):
            entry.int8_matmul_dequant(a, b, ones.double(), torch.ones(3, device=DEVICE))
        with pytest.raises(ValueError, match="do not fit"):
            entry.int8_matmul_dequant(a, b, ones, torch.ones(4, device=DEVICE))
        with pytest.raises(TypeError, match="torch.Tensor"):
            entry.int8_matmul_dequant(a, b, ones, 2.0)
        with pytest.raises(ValueError, match="2-D"):
            entry.quantize_rowwise(torch.ones(2, 3, 4, device=DEVICE))
