"""The names `lowbit.swap` (and the examples, benchmarks and tests) know layers by.

Each layer module registers its names, with the options that make each one, when it is imported:

    register_layer("switchback-row", SwitchBackLinear, "int8, row-wise weight", weight_quant="row")

A new format is then its package, its layer in `lowbit.nn`, and its `register_layer` lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["LayerSpec", "register_layer", "layer_spec", "layer_names", "LAYERS"]


@dataclass(frozen=True)
class LayerSpec:
    """A registered layer name: the LowbitLinear subclass and the options that make it."""

    name: str
    cls: type
    description: str
    options: dict = field(default_factory=dict)

    def build_kwargs(self, **overrides) -> dict:
        return {**self.options, **overrides}


_LAYERS: dict[str, LayerSpec] = {}
# Read-only view, in registration order.
LAYERS = MappingProxyType(_LAYERS)


def register_layer(name: str, cls: type, description: str, **options) -> LayerSpec:
    """Make `name` mean `cls(**options)` for swap; a name can be registered once."""
    if name in _LAYERS and _LAYERS[name].cls is not cls:
        raise ValueError(f"layer name {name!r} is already registered for {_LAYERS[name].cls.__name__}")
    spec = LayerSpec(name, cls, description, dict(options))
    _LAYERS[name] = spec
    return spec


def _load_builtin_layers() -> None:
    import lowbit.nn  # noqa: F401  (its modules register the built-in names)


def layer_names() -> tuple[str, ...]:
    """Every registered name, built-in ones first."""
    _load_builtin_layers()
    return tuple(_LAYERS)


def layer_spec(name: str) -> LayerSpec:
    """The spec registered as `name`, or a ValueError listing the names there are."""
    _load_builtin_layers()
    if name not in _LAYERS:
        raise ValueError(f"unknown layer name {name!r}; expected one of {list(_LAYERS)} or a LowbitLinear subclass")
    return _LAYERS[name]
