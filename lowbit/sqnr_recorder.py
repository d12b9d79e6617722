"""Measure each low-precision linear's error against the exact fp64 matmul on the live batch.

`SqnrRecorder(model)` wraps, for its duration, the `linear` method of every lowbit layer in the
model (LowbitLinear modules and the lowbit layers adapters use, `lowbit.adapters`) on the instance,
so every call is seen, whichever module makes it and whichever weight it is given. Per call:

  forward:    out vs F.linear(x, w, b) in fp64
  grad_input: (with grad=True, when the output is part of a backward) the layer's own backward
              on (x, w) with the incoming gradient g vs g @ w in fp64

SQNR = 10 log10(sum exact^2 / sum (got - exact)^2), summed over the calls of a weight. `rows`
limits each call to its first rows (x and g are quantized per row, so those rows come out exactly
as in the full call for the row-scaled recipes).
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn


def sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def lowbit_layers(model: nn.Module) -> dict[str, nn.Module]:
    """qualified name -> lowbit layer whose `linear` runs the model's low-precision matmuls."""
    from lowbit.nn.base import LowbitLinear

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LowbitLinear):
            layers[name] = module
        engine = module.__dict__.get("_lowbit_engine")
        if engine is not None:
            layers[name] = engine
    return layers


def _root(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


class SqnrRecorder:
    """with SqnrRecorder(model) as rec: run; then rec.forward_db() / rec.grad_db() -> {weight: dB}."""

    def __init__(self, model: nn.Module, *, grad: bool = True, rows: int | None = None, pause=None) -> None:
        self.model = model
        self.grad = grad
        self.rows = rows
        self.pause = pause  # a context that hides the measurement's own ops (MatmulTrace.paused)
        self.forward_sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.grad_sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.formats: dict[str, str] = {}
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._wrapped: list[nn.Module] = []

    def __enter__(self) -> SqnrRecorder:
        for name, layer in lowbit_layers(self.model).items():
            layer.linear = self._wrap(name, layer, type(layer).linear.__get__(layer))
            self._wrapped.append(layer)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self._wrapped:
            layer.__dict__.pop("linear", None)
        self._wrapped.clear()

    def _hidden(self):
        return self.pause() if self.pause is not None else nullcontext()

    def _wrap(self, layer_name: str, layer: nn.Module, linear):
        fmt = _format(layer)

        def recorded(input, weight, bias):
            out = linear(input, weight, bias)
            name = self._names.get(id(_root(weight)), f"{layer_name}.weight" if layer_name else "weight")
            self.formats[name] = fmt
            with self._hidden(), torch.no_grad():
                x = input.detach().reshape(-1, input.shape[-1])[: self.rows]
                w, b = weight.detach(), None if bias is None else bias.detach()
                exact = F.linear(x.double(), w.double(), None if b is None else b.double())
                got = out.detach().reshape(-1, out.shape[-1])[: self.rows].double()
                sums = self.forward_sums[name]
                sums[0] += exact.square().sum().item()
                sums[1] += (got - exact).square().sum().item()
            if self.grad and out.requires_grad and input.requires_grad:
                out.register_hook(lambda g: self._grad_input(name, linear, x, w, g))
            return out

        return recorded

    def _grad_input(self, name, linear, x, w, g) -> None:
        with self._hidden():
            g = g.detach().reshape(-1, g.shape[-1])[: self.rows]
            with torch.enable_grad():
                x = x.clone().requires_grad_(True)
                (got,) = torch.autograd.grad(linear(x, w, None), x, g)
            with torch.no_grad():
                exact = g.double() @ w.double()
                sums = self.grad_sums[name]
                sums[0] += exact.square().sum().item()
                sums[1] += (got.double() - exact).square().sum().item()

    def forward_db(self) -> dict[str, float]:
        return {name: sqnr_db(*s) for name, s in self.forward_sums.items()}

    def grad_db(self) -> dict[str, float]:
        return {name: sqnr_db(*s) for name, s in self.grad_sums.items()}


def _format(layer: nn.Module) -> str:
    config = getattr(layer, "config", None)
    if hasattr(config, "weight_quant"):
        return f"int8 ({config.weight_quant}-wise w)"
    if hasattr(config, "recipe"):
        return f"fp8 ({config.recipe})"
    return type(layer).__name__
