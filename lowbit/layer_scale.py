"""Zero-init layer-scale for open_clip and timm ViTs.

Paper (Wortsman, Dettmers et al. 2023, section 3): fp8 "tensorwise" training diverges as the
transformer blocks' feature magnitudes grow; a layer-scale initialised at zero, x + gamma * f(x) with
gamma = 0 at step 0, keeps them small and lets fp8 training match bf16.

Both libraries read an init value of 0 as "no layer-scale": timm's Block builds `LayerScale` only
`if init_values` (0.0 is falsy), and open_clip / timm configs leave it None by default. So do not
ask the constructor for 0: build the model with a small non-zero value (open_clip `ls_init_value`,
timm `init_values`) and call `zero_init_layer_scale`, or build it without and call
`add_layer_scale`.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["add_layer_scale", "layer_scale_modules", "zero_init_layer_scale"]

# (block attribute names, module that defines the LayerScale to insert there)
_SLOTS = (
    (("ls_1", "ls_2"), "open_clip.transformer"),  # open_clip ResidualAttentionBlock, CustomResidualAttentionBlock
    (("ls1", "ls2"), "timm.layers"),  # timm vision_transformer.Block and its kin
)


def _layer_scale_classes() -> tuple[type, ...]:
    """The LayerScale classes of the libraries imported so far (a model from one imports it)."""
    classes = []
    for module_name in ("open_clip.transformer", "timm.layers"):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "LayerScale"):
            classes.append(module.LayerScale)
    return tuple(classes)


def layer_scale_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every open_clip or timm LayerScale in `model`."""
    classes = _layer_scale_classes()
    if not classes:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, classes)]


def zero_init_layer_scale(model: nn.Module) -> nn.Module:
    """Set every open_clip / timm LayerScale's gamma to exactly 0, trainable. Returns `model`.

    gamma stays an nn.Parameter with requires_grad=True (its gradient, sum of f(x) * grad, is
    non-zero from the first step); timm's `init_values` is set to 0 too, so a later
    `reset_parameters()` keeps it at 0.

    Raises:
        ValueError: `model` has no LayerScale (built without layer-scale): use `add_layer_scale`.
    """
    found = layer_scale_modules(model)
    if not found:
        raise ValueError(
            "zero_init_layer_scale: the model has no open_clip or timm LayerScale (it was built without "
            "layer-scale, or with an init value of 0, which both libraries read as 'none'); call "
            "lowbit.add_layer_scale(model) instead, which adds zero-initialised layer-scale"
        )
    for _, module in found:
        with torch.no_grad():
            module.gamma.zero_()
        module.gamma.requires_grad_(True)
        if hasattr(module, "init_values"):
            module.init_values = 0.0
    return model


def _block_dim(block: nn.Module) -> int:
    for norm_name in ("ln_1", "norm1"):
        norm = getattr(block, norm_name, None)
        shape = getattr(norm, "normalized_shape", None)
        if shape:
            return int(shape[-1]) if isinstance(shape, (tuple, list, torch.Size)) else int(shape)
    raise ValueError(f"add_layer_scale: cannot tell the width of {type(block).__name__} (no ln_1 or norm1)")


def _new_layer_scale(module_name: str, dim: int, init: float, like: torch.Tensor) -> nn.Module:
    library = sys.modules[module_name]
    if module_name == "timm.layers":
        return library.LayerScale(dim, init_values=init, device=like.device, dtype=like.dtype)
    layer = library.LayerScale(dim, init_values=init)
    return layer.to(device=like.device, dtype=like.dtype)


def add_layer_scale(model: nn.Module, init: float = 0.0) -> nn.Module:
    """Give every open_clip / timm ViT block built without layer-scale a LayerScale, gamma = `init`.

    Replaces the nn.Identity at open_clip's ResidualAttentionBlock `ls_1` / `ls_2` and timm's Block
    `ls1` / `ls2` with that library's LayerScale of the block's width, on the block's device and
    dtype. Blocks that already have a LayerScale are left as they are (see `zero_init_layer_scale`).

    This adds Parameters: the state_dict gains `<block>.ls_1.gamma` (open_clip) or
    `<block>.ls1.gamma` (timm) keys, so a checkpoint saved before loads with `strict=False` (gamma
    then keeps `init`), and an optimizer must be built after this call to train them.

    Returns:
        `model`.

    Raises:
        ValueError: no open_clip or timm block with those slots was found.
    """
    init = float(init)
    blocks = 0
    for block in list(model.modules()):
        for slots, module_name in _SLOTS:
            if module_name not in sys.modules or not all(hasattr(block, s) for s in slots):
                continue
            blocks += 1
            like = next(block.parameters())
            for slot in slots:
                if isinstance(getattr(block, slot), nn.Identity):
                    setattr(block, slot, _new_layer_scale(module_name, _block_dim(block), init, like))
    if not blocks:
        raise ValueError(
            "add_layer_scale: found no open_clip ResidualAttentionBlock (ls_1/ls_2) or timm Block "
            "(ls1/ls2) in the model"
        )
    return model
