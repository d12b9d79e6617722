"""What `lowbit.kernels` exports (apart from __init__, which may have to step aside)."""

try:
    import triton  # noqa: F401
except ImportError as err:  # lowbit.int8.ops imports this module only when the Triton backend is asked for
    raise ImportError(
        "lowbit.kernels needs Triton (Linux): `pip install triton`, or use lowbit's torch backend "
        "(LOWBIT_BACKEND=torch)."
    ) from err

# quantize_* / int8_matmul_dequant check their inputs; launch_* are the same kernels for callers that
# already did (lowbit.int8.ops checks once, at its public entry).
from lowbit._inputs import MAX_INNER_DIM

from .dequantize_rowwise import launch_dequantize_rowwise
from .int8_matmul import int8_matmul_dequant, launch_int8_matmul_dequant
from .mm_dequant_rows import launch_mm_dequant_rows
from .quantize_rowwise import (
    launch_quantize_rowwise,
    launch_quantize_rowwise_column_sums,
    quantize_rowwise,
    quantize_rowwise_column_sums,
)
from .quantize_tiled import (
    launch_quantize_colwise_transposed,
    launch_quantize_tensorwise,
    launch_quantize_tensorwise_and_transpose,
    quantize_colwise_transposed,
    quantize_tensorwise,
    quantize_tensorwise_and_transpose,
)

__all__ = [
    "MAX_INNER_DIM",
    "int8_matmul_dequant",
    "launch_dequantize_rowwise",
    "launch_int8_matmul_dequant",
    "launch_mm_dequant_rows",
    "launch_quantize_colwise_transposed",
    "launch_quantize_rowwise",
    "launch_quantize_rowwise_column_sums",
    "launch_quantize_tensorwise",
    "launch_quantize_tensorwise_and_transpose",
    "quantize_colwise_transposed",
    "quantize_rowwise",
    "quantize_rowwise_column_sums",
    "quantize_tensorwise",
    "quantize_tensorwise_and_transpose",
]
