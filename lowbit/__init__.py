"""lowbit: low-bit training for vision-language transformers.

SwitchBack int8 linear layers, a module swap for open_clip and timm models, StableAdamW, a
loss-spike monitor and float8 layers, after Wortsman, Dettmers et al., "Stable and low-precision
training for large-scale vision-language models" (2023).
"""

from lowbit._backend import get_backend, use_backend
from lowbit.nn import SwitchBackLinear
from lowbit.monitor import SpikeMonitor
from lowbit.optim import StableAdamW
from lowbit.swap import swap, unswap

__version__ = "0.1.0"

__all__ = [
    "SwitchBackLinear",
    "StableAdamW",
    "SpikeMonitor",
    "swap",
    "unswap",
    "get_backend",
    "use_backend",
]
