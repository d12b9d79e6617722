"""What every adapter shares: a converted module is the same object under a subclass of its class.

An adapter converts a module whose forward reads a weight without calling an nn.Linear (F.linear on
a child's weight, `x @ self.proj`, a transposed Conv1D weight, a 1x1 convolution) by changing the
instance's class to a subclass of its own class that routes those matmuls through a lowbit layer's
`linear`. Nothing else changes: the object, its Parameters, children, hooks and state_dict keys stay
as they were, isinstance checks against the original class still hold, and no library's class or
function is patched. `to_original()` puts the original class back.
"""

from __future__ import annotations

from torch import nn

from lowbit.nn.base import LowbitLinear

_SUBCLASSES: dict[tuple[type, type], type] = {}


class Adapted:
    """Mixin of every adapted class; `_lowbit_original_class` is the class the module had."""

    _lowbit_original_class: type

    def to_original(self) -> nn.Module:
        """This module, under its original class again, without the lowbit state the adapter added."""
        for key in [k for k in self.__dict__ if k.startswith("_lowbit_")]:
            del self.__dict__[key]
        self.__class__ = type(self)._lowbit_original_class
        return self


def adapted_class(original: type, mixin: type) -> type:
    """The subclass of `original` with `mixin`'s overrides first (one per pair, built once)."""
    key = (original, mixin)
    if key not in _SUBCLASSES:
        name = f"Lowbit{original.__name__}"
        _SUBCLASSES[key] = type(name, (mixin, original), {"_lowbit_original_class": original,
                                                           "__module__": mixin.__module__})
    return _SUBCLASSES[key]


def adapt(module: nn.Module, mixin: type, engine: LowbitLinear | None = None) -> nn.Module:
    """Give `module` the adapted class of (its class, `mixin`), in place; `engine` serves its matmuls."""
    module.__class__ = adapted_class(type(module), mixin)
    if engine is not None:
        object.__setattr__(module, "_lowbit_engine", engine)  # not a submodule: no state_dict keys
    return module


def make_engine(cls: type[LowbitLinear], kwargs: dict, in_features: int, out_features: int, dtype) -> LowbitLinear:
    """A lowbit layer of `cls` that owns no real weight (meta device): only its `linear` is used,
    on the adapted module's own Parameters."""
    return cls(in_features, out_features, False, device="meta", dtype=dtype, **kwargs)


def engine_linear(module: nn.Module, x, weight, bias):
    """The adapted module's low-precision F.linear."""
    return module.__dict__["_lowbit_engine"].linear(x, weight, bias)


def class_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"
