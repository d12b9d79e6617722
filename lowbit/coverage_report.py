"""`lowbit.coverage(model, *args, **kwargs)`: which of a model's linear-like FLOPs ran in int8/fp8.

One forward (and with backward=True a backward of the outputs' sum) on the caller's inputs, under
`MatmulTrace` (every matmul against a weight, however the model calls it) and `SqnrRecorder` (each
low-precision layer's output against the exact fp64 matmul). The model's Parameters' gradients are
left as they are (the backward returns its gradients instead of accumulating them).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from lowbit.matmul_trace import MatmulTrace
from lowbit.sqnr_recorder import SqnrRecorder

__all__ = ["coverage", "CoverageReport", "LayerCoverage"]


@dataclass
class LayerCoverage:
    """One weight: its linear-like FLOPs and how many ran in low precision."""

    name: str
    format: str  # e.g. "int8", "fp8", "float32", "int8+float32"
    flops: float
    low_precision_flops: float
    ran: bool  # some of its matmuls ran in int8/fp8
    sqnr_db: float | None  # forward output vs exact fp64 (low-precision layers only)
    grad_sqnr_db: float | None  # grad_input vs exact fp64 (backward=True only)


@dataclass
class CoverageReport:
    layers: list[LayerCoverage]
    other_conv_flops: float  # convolutions that are not 1x1 (not counted as linear-like)

    @property
    def flops(self) -> float:
        return sum(layer.flops for layer in self.layers)

    @property
    def low_precision_fraction(self) -> float:
        total = self.flops
        return sum(layer.low_precision_flops for layer in self.layers) / total if total else 0.0

    @property
    def uncovered(self) -> list[LayerCoverage]:
        return [layer for layer in self.layers if layer.low_precision_flops < layer.flops]

    def to_dict(self) -> dict:
        def finite(v):
            return None if v is None or not math.isfinite(v) else v

        rows = []
        for layer in self.layers:
            row = asdict(layer)
            row["sqnr_db"], row["grad_sqnr_db"] = finite(layer.sqnr_db), finite(layer.grad_sqnr_db)
            rows.append(row)
        return {
            "low_precision_fraction": self.low_precision_fraction,
            "flops": self.flops,
            "other_conv_flops": self.other_conv_flops,
            "layers": rows,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        def db(v):
            return "-" if v is None else f"{v:6.1f}"

        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [
            f"low-precision share of linear-like FLOPs: {100 * self.low_precision_fraction:.1f}% "
            f"of {self.flops / 1e6:.2f} MFLOP" + (f" (other convolutions: {self.other_conv_flops / 1e6:.2f} MFLOP)"
                                                   if self.other_conv_flops else ""),
            f"{'layer':<{width}}  {'format':<14} {'MFLOP':>9}  {'low %':>6}  {'SQNR dB':>7}  {'grad dB':>7}",
        ]
        for layer in self.layers:
            share = 100 * layer.low_precision_flops / layer.flops if layer.flops else 0.0
            lines.append(
                f"{layer.name:<{width}}  {layer.format:<14} {layer.flops / 1e6:9.3f}  {share:6.1f}  "
                f"{db(layer.sqnr_db):>7}  {db(layer.grad_sqnr_db):>7}"
            )
        return "\n".join(lines)


def coverage(model: nn.Module, *args, backward: bool = False, **kwargs) -> CoverageReport:
    """Run `model(*args, **kwargs)` once (and with backward=True the backward of the sum of its
    outputs that need a gradient) and report, per weight, the linear-like FLOPs and the share that ran in int8/fp8.

    A swapped layer whose weight the model reads around the layer's forward shows up with its FLOPs
    in 16/32-bit; a swapped layer the call does not reach shows up with `flops == 0` and ran=False.
    """
    trace = MatmulTrace(model)

    @contextmanager
    def paused():
        previous, trace.paused = trace.paused, True
        try:
            yield
        finally:
            trace.paused = previous

    recorder = SqnrRecorder(model, grad=backward, pause=paused)
    with recorder, trace, torch.set_grad_enabled(backward or torch.is_grad_enabled()):
        out = model(*args, **kwargs)
        if backward:
            outs = [t for t in tree_flatten(_plain(out))[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            if not outs:
                raise ValueError("coverage(backward=True): the model's outputs need no gradient")
            leaves = [p for p in model.parameters() if p.requires_grad]
            leaves += [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            # autograd.grad, not backward: no .grad of the model or of the inputs is touched
            torch.autograd.grad(sum(t.float().sum() for t in outs), leaves, allow_unused=True)
    forward_db, grad_db = recorder.forward_db(), recorder.grad_db()

    names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    layers = []
    for name in dict.fromkeys(list(trace.weights) + list(recorder.formats)):
        counted = trace.weights.get(name)
        flops = counted.total if counted else 0.0
        low = counted.low if counted else 0.0
        formats = "+".join(sorted(counted.flops)) if counted else recorder.formats.get(name, "-")
        layers.append(LayerCoverage(
            name=name, format=formats, flops=flops, low_precision_flops=low, ran=low > 0,
            sqnr_db=forward_db.get(name), grad_sqnr_db=grad_db.get(name),
        ))
    order = {n: i for i, n in enumerate(names)}
    layers.sort(key=lambda layer: order.get(layer.name, len(order)))
    return CoverageReport(layers=layers, other_conv_flops=trace.other_conv_flops)


def _plain(out):
    """Model outputs as pytree-friendly containers (Hugging Face ModelOutput -> its tuple)."""
    to_tuple = getattr(out, "to_tuple", None)
    return to_tuple() if callable(to_tuple) else out
