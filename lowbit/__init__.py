"""lowbit: low-bit training for vision-language transformers.

SwitchBack int8 linear layers, a module swap for open_clip and timm models, StableAdamW, a
loss-spike monitor and float8 layers, after Wortsman, Dettmers et al., "Stable and low-precision
training for large-scale vision-language models" (2023).
"""

from lowbit._backend import get_backend, use_backend
from lowbit.coverage_report import CoverageReport, coverage
from lowbit.layer_scale import add_layer_scale, zero_init_layer_scale
from lowbit.monitor import SpikeMonitor
from lowbit.nn import Float8Linear, SwitchBackLinear
from lowbit.optim import StableAdamW
from lowbit.probe import FeatureProbe
from lowbit.registry import layer_names, register_layer
from lowbit.swap import ALL, swap, unswap

__version__ = "0.1.0"

__all__ = [
    "SwitchBackLinear",
    "Float8Linear",
    "zero_init_layer_scale",
    "add_layer_scale",
    "FeatureProbe",
    "StableAdamW",
    "SpikeMonitor",
    "swap",
    "ALL",
    "layer_names",
    "register_layer",
    "unswap",
    "coverage",
    "CoverageReport",
    "get_backend",
    "use_backend",
]
