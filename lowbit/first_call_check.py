"""After `swap`: warn, naming them, about swapped layers that did not run their own forward in the
model's first call, i.e. whose weight the model reads directly (F.linear(x, layer.weight, ...)) or
which the call did not use at all. Either way their FLOPs did not run in low precision.

Cost: one forward pre-hook per swapped layer and a hook on the model, removed after the first
completed eager call of the model's forward (under torch.compile they do nothing); nothing is
traced. `lowbit.coverage(model, inputs)` gives
the exact picture (every matmul against a weight, whoever calls it).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

logger = logging.getLogger("lowbit.swap")


def _low_precision_layers(model: nn.Module) -> dict[str, nn.Module]:
    from lowbit.adapters.base import Adapted
    from lowbit.nn.attention import LowbitMultiheadAttention
    from lowbit.nn.base import LowbitLinear

    modules = dict(model.named_modules())
    # A swapped attention runs all four projections itself, out_proj's through `out_proj.linear` (torch's
    # attention never calls out_proj's forward either): the attention module stands for them.
    served = {id(m.out_proj) for m in modules.values() if isinstance(m, LowbitMultiheadAttention)}
    return {
        name: module
        for name, module in modules.items()
        if (isinstance(module, LowbitLinear) and id(module) not in served)
        or isinstance(module, LowbitMultiheadAttention)
        or (isinstance(module, Adapted) and "_lowbit_engine" in module.__dict__)
    }


def warn_on_first_call(model: nn.Module) -> None:
    """Arm the check; it reports once, after the first call of `model`'s forward that returns."""
    layers = _low_precision_layers(model)
    if not layers:
        return
    ran: set[str] = set()
    handles = []

    def mark(name):
        def hook(module, args):
            if not torch.compiler.is_compiling():  # compiled graphs trace no bookkeeping
                ran.add(name)

        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(mark(name)))

    def report(module, args, output):
        if torch.compiler.is_compiling():
            return
        for handle in handles:
            handle.remove()
        skipped = [name for name in layers if name not in ran]
        if skipped:
            shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
            message = (
                f"lowbit.swap: {len(skipped)} of {len(layers)} swapped layers did not run their own forward in "
                f"the model's first call ({shown}); their weights are read directly by another module or were "
                "not used, so those matmuls did not run in low precision. lowbit.coverage(model, inputs) "
                "shows every matmul against a weight."
            )
            logger.warning(message)
            warnings.warn(message, stacklevel=2)

    handles.append(model.register_forward_hook(report))
