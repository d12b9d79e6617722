"""Configuration of the float8 layers: the recipe and where the matmuls run, checked once."""

from __future__ import annotations

from dataclasses import dataclass

# recipe -> (activation and gradient scaling, grad_weight precision): presets over per-operand
# scaling, in the vocabulary of SwitchBackConfig. The weight has one scale in both.
RECIPE_PRESETS = {
    "tensorwise": ("tensor", "fp8"),
    "switchback": ("row", "high"),
}
RECIPES = tuple(RECIPE_PRESETS)


@dataclass(frozen=True)
class Float8Config:
    """How a Float8Linear casts and multiplies.

    Attributes:
        recipe: "tensorwise" (one scale per tensor, all three matmuls in fp8: the paper's fp8
            baseline, which diverges at scale without zero-init layer-scale) or "switchback"
            (x and grad_output scaled per row, the weight per tensor, the weight gradient in the
            input's dtype: SwitchBack's split with fp8 instead of int8).
        simulate: None (real fp8 through torch._scaled_mm on CUDA GPUs with compute capability
            >= 8.9, simulated elsewhere), True (always simulated: cast to fp8 and back, fp32
            matmul) or False (always torch._scaled_mm; raises on a device without fp8).
    """

    recipe: str = "tensorwise"
    simulate: bool | None = None

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if not (self.simulate is None or isinstance(self.simulate, bool)):
            raise ValueError(f"simulate must be None, True or False, got {self.simulate!r}")

    @property
    def activation_scaling(self) -> str:
        """How x (forward) and grad_output (backward) are scaled: "tensor" or "row"."""
        return RECIPE_PRESETS[self.recipe][0]

    @property
    def weight_scaling(self) -> str:
        return "tensor"

    @property
    def grad_weight(self) -> str:
        """The precision of g.T @ x: "fp8" or "high" (the input's dtype)."""
        return RECIPE_PRESETS[self.recipe][1]
