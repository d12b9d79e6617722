"""What `lowbit.kernels` exports (apart from __init__, which may have to step aside)."""

try:
    import triton  # noqa: F401
except ImportError as err:  # lowbit.int8.ops imports this module only when the Triton backend is asked for
    raise ImportError(
        "lowbit.kernels needs Triton (Linux): `pip install triton`, or use lowbit's torch backend "
        "(LOWBIT_BACKEND=torch)."
    ) from err

from .int8_matmul import MAX_INNER_DIM, int8_matmul_dequant
from .quantize_colwise import quantize_colwise_transposed
from .quantize_rowwise import quantize_rowwise
from .quantize_tensorwise import quantize_tensorwise

__all__ = [
    "MAX_INNER_DIM",
    "int8_matmul_dequant",
    "quantize_colwise_transposed",
    "quantize_rowwise",
    "quantize_tensorwise",
]
