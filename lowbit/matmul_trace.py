"""Count every matmul against a model's weights, in whatever precision it ran, by watching aten ops.

A TorchDispatchMode sees each op below autograd, whoever calls it (a layer's forward, F.linear on
a borrowed weight, `x @ self.proj`, backward). Tensors derived from a weight Parameter (>= 2-D) by
ops whose every input is derived from that weight (casts, views, transposes, the quantize math) are
tagged with the weight's name; int8 / float8 tensors, and tensors derived from one of them by such
ops (a simulated fp8 operand cast back to fp32), are tagged with their format. A matmul (mm, addmm,
bmm, baddbmm, _int_mm, _scaled_mm, or a convolution with a 1x1 kernel and groups=1) with a tagged
weight operand is a linear-like matmul of that weight (forward and grad_input; grad_weight = g.T @ x
has no weight operand and is not counted); it ran in low precision when both operands
are int8 / float8 or tagged as such. Other convolutions are counted apart (`other_conv_flops`).

Tagged tensors are kept alive while tracing so that their storage (the tag's key) is not reused.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

LOW_DTYPES = {torch.int8: "int8", torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8"}
# ops whose output must not inherit a weight's tag (an embedding row is an activation)
_NO_TAG = {aten.embedding.default, aten.index_select.default, aten.index.Tensor, aten.gather.default}


@dataclass
class WeightFlops:
    """Linear-like FLOPs against one weight, by the format they ran in ("int8", "fp8", "float32" ...)."""

    flops: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def total(self) -> float:
        return sum(self.flops.values())

    @property
    def low(self) -> float:
        return sum(v for k, v in self.flops.items() if k in ("int8", "fp8"))


def _key(t: torch.Tensor):
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr())


class MatmulTrace(TorchDispatchMode):
    """with MatmulTrace(model) as trace: ... -> trace.weights[name] (WeightFlops), trace.other_conv_flops."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.weights: dict[str, WeightFlops] = defaultdict(WeightFlops)
        self.other_conv_flops = 0.0
        self.paused = False
        self._weight: dict = {}  # storage key -> weight name
        self._format: dict = {}  # storage key -> "int8" / "fp8"
        self._alive: list[torch.Tensor] = []
        for name, param in model.named_parameters():
            if param.dim() >= 2 and _key(param) is not None:
                self._weight.setdefault(_key(param), name)

    def __exit__(self, *exc):
        self._alive.clear()
        return super().__exit__(*exc)

    def _weight_of(self, t) -> str | None:
        return self._weight.get(_key(t)) if isinstance(t, torch.Tensor) else None

    def _format_of(self, t) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        return LOW_DTYPES.get(t.dtype) or self._format.get(_key(t))

    def _count(self, weight: str, a: torch.Tensor, b: torch.Tensor, flops: float) -> None:
        fa, fb = self._format_of(a), self._format_of(b)
        fmt = fa if fa is not None and fa == fb else str(a.dtype).removeprefix("torch.")
        self.weights[weight].flops[fmt] += flops

    def _matmul(self, func, args, out) -> bool:
        """Count a matmul against a weight; True if `func` is a matmul (its output gets no tag)."""
        if func in (aten.mm.default, aten.bmm.default, aten._int_mm.default, aten._scaled_mm.default):
            a, b = args[0], args[1]
        elif func in (aten.addmm.default, aten.baddbmm.default):
            a, b = args[1], args[2]
        elif func is aten.convolution.default:
            x, w = args[0], args[1]
            groups = args[8]
            flops = 2.0 * out.numel() * (w.shape[1] * math.prod(w.shape[2:]))
            name = self._weight_of(w)
            if name is not None and groups == 1 and all(k == 1 for k in w.shape[2:]):
                self._count(name, x, w, flops)
            else:
                self.other_conv_flops += flops
            return True
        elif func is aten.convolution_backward.default:
            grad, x, w = args[0], args[1], args[2]
            groups, mask = args[9], args[10]
            flops = 2.0 * grad.numel() * (w.shape[1] * math.prod(w.shape[2:]))
            name = self._weight_of(w)
            if mask[0]:  # grad_input is against the weight; grad_weight is not (as for mm)
                if name is not None and groups == 1 and all(k == 1 for k in w.shape[2:]):
                    self._count(name, grad, w, flops)
                else:
                    self.other_conv_flops += flops
            return True
        else:
            return False
        m, k = a.shape[-2], a.shape[-1]
        n = b.shape[-1]
        flops = 2.0 * m * k * n * (a.shape[0] if a.dim() == 3 else 1)
        name = self._weight_of(b) or self._weight_of(a)
        if name is not None:
            self._count(name, a, b, flops)
        return True

    def _tag(self, func, args, kwargs, out) -> None:
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not inputs or not outputs:
            return
        relevant = [t for t in inputs if t.numel() > 1 or self._weight_of(t) or self._format_of(t)]
        names = {self._weight_of(t) for t in relevant}
        formats = {self._format_of(t) for t in relevant}
        weight = names.pop() if len(names) == 1 and func not in _NO_TAG else None
        fmt = formats.pop() if len(formats) == 1 else None
        for t in outputs:
            key = _key(t)
            if key is None:
                continue
            if weight is not None:
                self._weight[key] = weight
            if fmt is not None and t.dtype not in LOW_DTYPES:
                self._format[key] = fmt
            if weight is not None or fmt is not None:
                self._alive.append(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused and not self._matmul(func, args, out):
            self._tag(func, args, kwargs, out)
        return out
