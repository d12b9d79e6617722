"""float8 (e4m3 / e5m2, simulated anywhere, torch._scaled_mm where the GPU has fp8): the config, the
ops (the numerical contract) and the autograd Function."""

from lowbit.float8.config import Float8Config
from lowbit.float8.functional import float8_linear

__all__ = ["Float8Config", "float8_linear"]
