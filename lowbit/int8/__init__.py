"""int8 (SwitchBack and the LLM.int8() baseline): the config, the ops (the numerical contract, Triton
or its torch twin) and the autograd Function that decides which matmul runs in int8."""

from lowbit.int8.config import SwitchBackConfig
from lowbit.int8.functional import switchback_linear

__all__ = ["SwitchBackConfig", "switchback_linear"]
