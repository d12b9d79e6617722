"""Swap a model's nn.Linear and nn.MultiheadAttention for lowbit layers in place, and back.

Parameters are shared, not copied, so devices, dtypes, requires_grad, optimizer references and
state_dict keys stay as they were: a checkpoint of either model loads into the other.

What a swap did is logged (logger "lowbit.swap"): how many layers were swapped or re-targeted, and
how many were left and why; a swap that converts nothing warns.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from lowbit.adapters import find_adapter, is_adapted
from lowbit.first_call_check import warn_on_first_call
from lowbit.nn.attention import (
    LowbitMultiheadAttention,
    no_fast_path_class,
    with_fast_path,
    without_fast_path,
)
from lowbit.nn.base import LowbitLinear
from lowbit.registry import layer_names, layer_spec

__all__ = ["swap", "unswap", "default_filter", "ALL", "MIN_FEATURES"]

logger = logging.getLogger("lowbit.swap")

# Below this width the quantize passes cost about as much as the int8 GEMM saves: the paper's
# speed-ups (Fig. 4) grow with the layer's dimension and are small under ~1k.
MIN_FEATURES = 512

NARROW = f"narrower than MIN_FEATURES={MIN_FEATURES} (default_filter; filter_fn=lowbit.ALL swaps them)"

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, name: str) -> bool:
    """Swap layers whose smaller side is at least MIN_FEATURES wide (attention: its embed_dim).

    Narrow layers gain nothing from int8 (the quantization passes are memory-bound and cost as
    much as they save) but still pay its error. Pass `filter_fn=lowbit.ALL` to swap every layer,
    as tests and CPU-sized models do.
    """
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim >= MIN_FEATURES
    if (adapter := find_adapter(module)) is not None:
        return adapter.default_keep(module, MIN_FEATURES)
    return min(module.in_features, module.out_features) >= MIN_FEATURES


def ALL(module: nn.Module, name: str) -> bool:  # noqa: N802 (a constant-like filter)
    """A filter_fn that swaps every layer it is offered."""
    return True


def _resolve(to: str | type[LowbitLinear], layer_kwargs: dict) -> tuple[type[LowbitLinear], dict]:
    if isinstance(to, type):
        if not issubclass(to, LowbitLinear):
            raise TypeError(f"swap: `to` must be a LowbitLinear subclass or one of {list(layer_names())}, got {to}")
        return to, dict(layer_kwargs)
    spec = layer_spec(to)
    return spec.cls, spec.build_kwargs(**layer_kwargs)


def _is_candidate(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.MultiheadAttention)) or find_adapter(module) is not None


def _same_layer(a: LowbitLinear, b: LowbitLinear) -> bool:
    return type(a) is type(b) and getattr(a, "config", None) == getattr(b, "config", None)


def _convert(module: nn.Module, cls: type[LowbitLinear], kwargs: dict) -> tuple[nn.Module, str]:
    """(the module to put in place, what happened: "swapped", "retargeted" or "already")."""
    if (adapter := find_adapter(module)) is not None:  # converted in place, under a subclass
        if not is_adapted(module):
            return adapter.convert(module, cls, kwargs), "swapped"
        engine = module.__dict__.get("_lowbit_engine")
        target = cls(1, 1, False, device="meta", **kwargs)
        if engine is not None and _same_layer(target, engine):
            return module, "already"
        return adapter.convert(module.to_original(), cls, kwargs), "retargeted"
    if isinstance(module, LowbitMultiheadAttention):
        target = cls.from_linear(module.out_proj.to_original(), **kwargs)
        if _same_layer(target, module.out_proj):
            return module, "already"
        return LowbitMultiheadAttention.from_mha(module.to_original(), cls, **kwargs), "retargeted"
    if isinstance(module, nn.MultiheadAttention):
        return LowbitMultiheadAttention.from_mha(module, cls, **kwargs), "swapped"
    if isinstance(module, LowbitLinear):
        target = cls.from_linear(module.to_original(), **kwargs)
        return (module, "already") if _same_layer(target, module) else (target, "retargeted")
    return cls.from_linear(module, **kwargs), "swapped"


def _replace(parent: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    if new is not old:
        setattr(parent, name, new)


def _holds_lowbit(module: nn.Module) -> bool:
    return any(isinstance(m, (LowbitLinear, LowbitMultiheadAttention)) for m in module.modules())


def _guard_fast_paths(module: nn.Module) -> nn.Module:
    """Post-order: torch Transformer modules that hold swapped layers lose their fused fast paths."""
    for name, child in list(module.named_children()):
        _replace(module, name, child, _guard_fast_paths(child))
    if no_fast_path_class(module) is not None and _holds_lowbit(module):
        return without_fast_path(module)
    return module


def _log_summary(to, counts: Counter, left: Counter, scripted: list[str]) -> None:
    done = counts["swapped"] + counts["retargeted"]
    parts = [f"{counts[k]} {k}" for k in ("swapped", "retargeted", "already") if counts[k]]
    reasons = [f"{n} {why}" for why, n in left.items()]
    logger.info(
        "lowbit.swap to %s: %s; left as they were: %s",
        to if isinstance(to, str) else to.__name__,
        ", ".join(parts) or "nothing converted",
        "; ".join(reasons) or "none",
    )
    if scripted:
        warnings.warn(
            f"lowbit.swap: left TorchScript submodules as they are (their layers cannot be swapped): "
            f"{', '.join(scripted)}; swap the Python modules before torch.jit.script",
            stacklevel=3,
        )
    if not done and not counts["already"]:
        why = "; ".join(reasons) or "the model has no nn.Linear or nn.MultiheadAttention"
        warnings.warn(f"lowbit.swap converted no layer: {why}", stacklevel=3)


def swap(
    model: nn.Module,
    to: str | type[LowbitLinear] = "switchback-row",
    *,
    filter_fn: FilterFn | None = None,
    **layer_kwargs,
) -> nn.Module:
    """Replace `model`'s nn.Linear and nn.MultiheadAttention layers with lowbit layers, in place.

    Args:
        model: any nn.Module (open_clip and timm ViTs, nn.Transformer* included); not a TorchScript
            module (swap first, then script).
        to: a LowbitLinear subclass, or a registered name (`lowbit.layer_names()`): "switchback-row"
            (the default: int8 weight scaled per output row in the forward, per input column in
            grad_input), "switchback" (the paper's tensor-wise weight), "switchback-memeff",
            "llm-int8", "fp8-tensorwise", "fp8-switchback". Row-wise is the default because one
            outlier weight costs a tensor-wise layer its whole precision (README, "Default recipe").
            Layers already swapped to another format are re-targeted to this one.
        filter_fn: `filter_fn(module, qualified_name) -> bool` picks the layers to swap;
            `default_filter` (layers at least MIN_FEATURES wide) when None, `lowbit.ALL` for all.
        **layer_kwargs: options for the layer class (e.g. weight_quant="row").

    Returns:
        `model` (or the new layer, if `model` itself is a layer). Hooks registered on a replaced
        module stay on the original module, not the new one. torch's nn.Transformer* modules that
        hold swapped layers are given a class that never takes torch's fused fast path.

    Raises:
        TypeError: `model` is a torch.jit.ScriptModule.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "lowbit.swap: got a TorchScript module, whose layers cannot be replaced; swap the Python "
            "module (before torch.jit.script / torch.jit.trace), or use torch.compile instead"
        )
    cls, kwargs = _resolve(to, layer_kwargs)
    keep = filter_fn or default_filter
    counts, left, scripted = Counter(), Counter(), []

    def visit(module: nn.Module, name: str) -> nn.Module:
        if isinstance(module, torch.jit.ScriptModule):
            scripted.append(name or "<model>")
            return module
        if _is_candidate(module):
            adapted = find_adapter(module) is not None
            if keep(module, name):
                module, what = _convert(module, cls, kwargs)
                counts[what] += 1
                if not adapted:
                    return module
            else:
                left[NARROW if filter_fn is None else "refused by filter_fn"] += 1
                if isinstance(module, (nn.Linear, nn.MultiheadAttention)):
                    return module  # an attention module's projections go with it
        # Adapted modules (converted in place) and every other module: on to the children.
        for child_name, child in list(module.named_children()):
            _replace(module, child_name, child, visit(child, f"{name}.{child_name}" if name else child_name))
        return module

    model = _guard_fast_paths(visit(model, ""))
    _log_summary(to, counts, left, scripted)
    warn_on_first_call(model)
    return model


def unswap(model: nn.Module) -> nn.Module:
    """Put back layers of the original classes (same attributes) that `swap` replaced, holding the
    Parameters trained since. Returns `model`, or the restored layer if `model` is a swapped layer."""
    if isinstance(model, (LowbitLinear, LowbitMultiheadAttention)):
        return model.to_original()
    if is_adapted(model):
        model.to_original()  # in place; its children are restored below
    for name, child in list(model.named_children()):
        _replace(model, name, child, unswap(child))
    if "_lowbit_original" in model.__dict__ and no_fast_path_class(model.__dict__["_lowbit_original"]):
        return with_fast_path(model)
    return model
