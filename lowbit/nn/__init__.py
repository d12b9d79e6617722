"""lowbit's layers: parameters and configuration only; the math is in lowbit.int8 and lowbit.float8."""

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
from lowbit.nn.switchback import SwitchBackLinear

__all__ = [
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
