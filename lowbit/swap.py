"""Swap a model's nn.Linear and nn.MultiheadAttention for lowbit layers in place, and back.

Parameters are shared, not copied, so devices, dtypes, requires_grad, optimizer references and
state_dict keys stay as they were: a checkpoint of either model loads into the other.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lowbit.adapters import find_adapter, is_adapted
from lowbit.first_call_check import warn_on_first_call
from lowbit.nn.attention import LowbitMultiheadAttention, can_wrap
from lowbit.nn.base import LowbitLinear

__all__ = ["swap", "unswap", "default_filter", "MIN_FEATURES", "LAYER_NAMES"]

# name -> (layer class, its options); fp8 names resolve when lowbit.nn has Float8Linear.
LAYER_NAMES = {
    "switchback": ("SwitchBackLinear", {}),
    "switchback-row": ("SwitchBackLinear", {"weight_quant": "row"}),
    "switchback-memeff": ("SwitchBackLinear", {"mem_efficient": True}),
    "fp8-tensorwise": ("Float8Linear", {"recipe": "tensorwise"}),
    "fp8-switchback": ("Float8Linear", {"recipe": "switchback"}),
}

# Below this width the quantize passes cost about as much as the int8 GEMM saves: the paper's
# speed-ups (Fig. 4) grow with the layer's dimension and are small under ~1k.
MIN_FEATURES = 512

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, name: str) -> bool:
    """Swap layers whose smaller side is at least MIN_FEATURES wide (attention: its embed_dim).

    Narrow layers gain nothing from int8 (the quantization passes are memory-bound and cost as
    much as they save) but still pay its error. Pass `filter_fn=lambda module, name: True` to swap
    every layer, as tests and CPU-sized models do.
    """
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim >= MIN_FEATURES
    if (adapter := find_adapter(module)) is not None:
        return adapter.default_keep(module, MIN_FEATURES)
    return min(module.in_features, module.out_features) >= MIN_FEATURES


def _resolve(to: str | type[LowbitLinear], layer_kwargs: dict) -> tuple[type[LowbitLinear], dict]:
    if isinstance(to, type):
        if not issubclass(to, LowbitLinear):
            raise TypeError(f"swap: `to` must be a LowbitLinear subclass or one of {list(LAYER_NAMES)}, got {to}")
        return to, dict(layer_kwargs)
    if to not in LAYER_NAMES:
        raise ValueError(f"swap: unknown layer name {to!r}; expected one of {list(LAYER_NAMES)} or a class")
    class_name, options = LAYER_NAMES[to]
    from lowbit import nn as lowbit_nn

    cls = getattr(lowbit_nn, class_name, None)
    if cls is None:
        raise NotImplementedError(f"swap: {to!r} needs lowbit.nn.{class_name}, which this version does not have")
    return cls, {**options, **layer_kwargs}


def _swap_one(module: nn.Module, cls: type[LowbitLinear], kwargs: dict) -> nn.Module:
    if (adapter := find_adapter(module)) is not None:
        return adapter.convert(module, cls, kwargs)
    if isinstance(module, nn.MultiheadAttention):
        return LowbitMultiheadAttention.from_mha(module, cls, **kwargs)
    return cls.from_linear(module, **kwargs)


def _is_candidate(module: nn.Module) -> bool:
    if find_adapter(module) is not None:
        return True
    if isinstance(module, nn.MultiheadAttention):
        return can_wrap(module)
    return isinstance(module, nn.Linear) and not isinstance(module, LowbitLinear)


def swap(
    model: nn.Module,
    to: str | type[LowbitLinear] = "switchback-row",
    *,
    filter_fn: FilterFn | None = None,
    **layer_kwargs,
) -> nn.Module:
    """Replace `model`'s nn.Linear and nn.MultiheadAttention layers with lowbit layers, in place.

    Args:
        model: any nn.Module (open_clip and timm ViTs included).
        to: a LowbitLinear subclass, or one of "switchback-row" (the default: int8 weight scaled
            per output row in the forward, per input column in grad_input), "switchback" (the
            paper's tensor-wise weight), "switchback-memeff", "fp8-tensorwise", "fp8-switchback".
            Row-wise is the default because one outlier weight costs a tensor-wise layer its whole
            precision (README, "Default recipe").
        filter_fn: `filter_fn(module, qualified_name) -> bool` picks the layers to swap;
            `default_filter` (layers at least MIN_FEATURES wide) when None.
        **layer_kwargs: options for the layer class (e.g. weight_quant="row").

    Returns:
        `model` (or the new layer, if `model` itself is an nn.Linear). nn.MultiheadAttention with
        separate k/v dims, bias_k/bias_v or add_zero_attn is left as it is. Hooks registered on a
        replaced module stay on the original module, not the new one.
    """
    cls, kwargs = _resolve(to, layer_kwargs)
    keep = filter_fn or default_filter
    if _is_candidate(model) and keep(model, ""):
        swapped = _swap_one(model, cls, kwargs)
        if swapped is not model:  # a replaced layer; adapters convert in place and go on to the children
            return swapped
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, (nn.MultiheadAttention, LowbitMultiheadAttention)):
            continue  # their projections are swapped as part of the attention module
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if _is_candidate(child) and keep(child, name):
                setattr(parent, child_name, _swap_one(child, cls, kwargs))
    warn_on_first_call(model)
    return model


def unswap(model: nn.Module) -> nn.Module:
    """Put back layers of the original classes (same attributes) that `swap` replaced, holding the
    Parameters trained since. Returns `model`, or the restored layer if `model` is a swapped layer."""
    if isinstance(model, (LowbitLinear, LowbitMultiheadAttention)):
        return model.to_original()
    if is_adapted(model):
        model.to_original()  # in place; its children are restored below
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (LowbitLinear, LowbitMultiheadAttention)) or is_adapted(child):
                setattr(parent, child_name, child.to_original())
    return model
