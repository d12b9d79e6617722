"""Block-scaled formats (MX: mxfp8, mxfp8-e5m2, mxfp4; NVFP4; fp8 blockwise), simulated in plain
torch on any device: the config, the ops (the numerical rules) and the autograd Function."""

from lowbit.mx.config import FORMATS, BlockConfig
from lowbit.mx.functional import block_linear

__all__ = ["FORMATS", "BlockConfig", "block_linear"]
