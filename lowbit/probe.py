"""FeatureProbe: the largest |activation| each transformer block outputs, recorded through forward hooks.

Paper (Wortsman, Dettmers et al. 2023, section 3): fp8 "tensorwise" training fails when feature
magnitudes grow, since one large value sets the scale of a whole tensor and the rest lose their
precision. This is the quantity to watch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = ["FeatureProbe", "find_blocks"]

# Containers whose children are the transformer blocks: open_clip's Transformer.resblocks
# (ModuleList), timm's VisionTransformer.blocks (Sequential).
BLOCK_CONTAINERS = ("resblocks", "blocks")


def find_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> block for every child of a ModuleList / Sequential named in BLOCK_CONTAINERS."""
    blocks = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in BLOCK_CONTAINERS and isinstance(module, (nn.ModuleList, nn.Sequential)):
            for child_name, child in module.named_children():
                blocks[f"{name}.{child_name}"] = child
    return blocks


class FeatureProbe:
    """Records max |output| of each transformer block over the forwards run since the last reset.

    Args:
        model: the model (open_clip CLIP or VisionTransformer, timm VisionTransformer, ...).
        blocks: the modules to watch, as {name: module} or an iterable of modules of `model`
            (named by their qualified names); by default the children of every `resblocks` /
            `blocks` container (open_clip, timm).

    The running maxima stay on the model's device: a forward costs one reduction per block and no
    host synchronisation; reading `max_abs` transfers them all at once. A block returning a tuple
    is measured on its first element. NaN anywhere in a block's output makes its maximum NaN.

    Usage:
        with lowbit.FeatureProbe(model) as probe:
            loss = model(x).sum()
            print(probe.max_abs)  # {"blocks.0": 3.1, "blocks.1": 5.7, ...}
    """

    def __init__(self, model: nn.Module, *, blocks: Mapping[str, nn.Module] | Iterable[nn.Module] | None = None):
        if blocks is None:
            named = find_blocks(model)
            if not named:
                raise ValueError(
                    "FeatureProbe: no `resblocks` or `blocks` container in the model; pass the modules "
                    "to watch with blocks={name: module} or blocks=[module, ...]"
                )
        elif isinstance(blocks, Mapping):
            named = dict(blocks)
        else:
            names = {id(m): n for n, m in model.named_modules()}
            named = {}
            for i, module in enumerate(blocks):
                named[names.get(id(module), f"block{i}")] = module
        self._running: dict[str, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in named.items()]
        self.names = list(named)

    def _hook(self, name: str):
        def record(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor) or out.numel() == 0:
                return
            with torch.no_grad():
                # max |x| in one reduction, without an abs() copy of the activation
                current = torch.linalg.vector_norm(out.detach(), ord=float("inf")).float()
                previous = self._running.get(name)
                self._running[name] = current if previous is None else torch.maximum(previous, current)

        return record

    @property
    def max_abs(self) -> dict[str, float]:
        """Block name -> max |output| since the last reset (blocks not run since are left out)."""
        if not self._running:
            return {}
        device = next(iter(self._running.values())).device
        values = torch.stack([v.to(device) for v in self._running.values()]).tolist()  # one transfer
        return dict(zip(self._running, values))

    def max(self) -> float:
        """The largest max |output| over all blocks (nan if one is NaN, 0.0 before any forward)."""
        values = list(self.max_abs.values())
        if any(math.isnan(v) for v in values):
            return float("nan")
        return max(values, default=0.0)

    def reset(self) -> None:
        """Forget the maxima recorded so far (e.g. once per training step)."""
        self._running.clear()

    def remove(self) -> None:
        """Remove the hooks; the recorded maxima stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
