"""Adapters for layers whose forward reads a weight without calling an nn.Linear.

Each adapter is one file, keyed on the exact classes it converts (TARGETS, "module:qualname"), with
`applies(module)`, `default_keep(module, min_features)` (for `swap.default_filter`) and
`convert(module, layer_cls, layer_kwargs)`. A converted module is the same object under a subclass
of its class (see `lowbit.adapters.base`); `to_original()` undoes it and `unswap` calls it.
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from lowbit.adapters import (
    conv1x1,
    hf_conv1d,
    open_clip_attention,
    open_clip_attention_pool,
    open_clip_projection,
    timm_attention,
)
from lowbit.adapters.base import Adapted, class_key

__all__ = ["ADAPTERS", "find_adapter", "is_adapted", "Adapted"]

ADAPTERS: list[ModuleType] = [
    timm_attention,
    open_clip_attention,
    open_clip_attention_pool,
    open_clip_projection,
    hf_conv1d,
    conv1x1,
]


def find_adapter(module: nn.Module) -> ModuleType | None:
    """The adapter for `module`'s exact class (subclasses may override forward), if it applies; for
    a module it already converted, the adapter of its original class."""
    key = class_key(getattr(type(module), "_lowbit_original_class", type(module)))
    for adapter in ADAPTERS:
        if key in adapter.TARGETS and adapter.applies(module):
            return adapter
    return None


def is_adapted(module: nn.Module) -> bool:
    return isinstance(module, Adapted)
