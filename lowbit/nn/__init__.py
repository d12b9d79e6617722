"""lowbit's layers: parameters and configuration only; the math is in lowbit.int8, lowbit.float8 and lowbit.mx."""

from lowbit.nn.attention import (
    LowbitMultiheadAttention,
    LowbitTransformer,
    LowbitTransformerDecoder,
    LowbitTransformerDecoderLayer,
    LowbitTransformerEncoder,
    LowbitTransformerEncoderLayer,
)
from lowbit.nn.base import LowbitLinear
from lowbit.nn.float8 import Float8Linear
from lowbit.nn.mx import BlockScaledLinear
from lowbit.nn.switchback import SwitchBackLinear

__all__ = [
    "BlockScaledLinear",
    "Float8Linear",
    "LowbitLinear",
    "LowbitMultiheadAttention",
    "LowbitTransformer",
    "LowbitTransformerDecoder",
    "LowbitTransformerDecoderLayer",
    "LowbitTransformerEncoder",
    "LowbitTransformerEncoderLayer",
    "SwitchBackLinear",
]
