"""Configuration of the block-scaled layers (MX, NVFP4, fp8 blockwise): the format, checked once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockFormat:
    """One block-scaled format: what its elements are and how its scales are made.

    Attributes:
        element: "e4m3", "e5m2" or "e2m1" (see ops.ELEMENTS).
        block: elements per scale along the GEMM's reduction dimension.
        scale: "e8m0" (MX: a power of two), "e4m3-tensor" (NVFP4: an e4m3 block scale times an
            fp32 tensor scale) or "fp32" (fp8 blockwise: amax / 448).
        weight_rows: rows of the weight sharing one scale (128 for fp8 blockwise's 128x128 blocks;
            1 elsewhere, where the weight is blocked like the activations).
    """

    element: str
    block: int
    scale: str
    weight_rows: int = 1


FORMATS = {
    "mxfp8": BlockFormat("e4m3", 32, "e8m0"),
    "mxfp8-e5m2": BlockFormat("e5m2", 32, "e8m0"),
    "mxfp4": BlockFormat("e2m1", 32, "e8m0"),
    "nvfp4": BlockFormat("e2m1", 16, "e4m3-tensor"),
    "fp8-blockwise": BlockFormat("e4m3", 128, "fp32", weight_rows=128),
}
GRAD_WEIGHT = ("high", "format")


@dataclass(frozen=True)
class BlockConfig:
    """How a BlockScaledLinear casts and multiplies.

    Attributes:
        format: one of FORMATS. The forward (x @ w.T) and grad-input (g @ w) GEMMs run in it.
        grad_weight: "high" (g.T @ x in the input's dtype, SwitchBack's split; the default) or
            "format" (g.T @ x in the format too, blocks along the batch dimension).
    """

    format: str = "mxfp8"
    grad_weight: str = "high"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {tuple(FORMATS)}, got {self.format!r}")
        if self.grad_weight not in GRAD_WEIGHT:
            raise ValueError(f"grad_weight must be one of {GRAD_WEIGHT}, got {self.grad_weight!r}")

    @property
    def spec(self) -> BlockFormat:
        return FORMATS[self.format]
