"""Float8Linear: an nn.Linear whose matmuls run in float8, simulated or on fp8 tensor cores."""

from __future__ import annotations

import torch

from lowbit.float8.config import Float8Config
from lowbit.float8.functional import float8_linear
from lowbit.nn.base import LowbitLinear
from lowbit.registry import register_layer


class Float8Linear(LowbitLinear):
    """Drop-in nn.Linear with float8 matmuls (Wortsman, Dettmers et al. 2023, section 3).

    x and w are cast to e4m3, gradients to e5m2, each scaled by its amax (saturating casts).

    Args:
        in_features, out_features, bias, device, dtype: as for nn.Linear.
        recipe: "tensorwise" (one scale per tensor, all three matmuls fp8: the paper's baseline) or
            "switchback" (x and gradients per row, weight per tensor, weight gradient in the
            input's dtype).
        simulate: None (real fp8 via torch._scaled_mm on CUDA GPUs with compute capability >= 8.9,
            simulated elsewhere), True (always simulated) or False (always real; raises on a
            device without fp8).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        recipe: str = "tensorwise",
        simulate: bool | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = Float8Config(recipe=recipe, simulate=simulate)

    def linear(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return float8_linear(input, weight, bias, config=self.config)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.config.recipe!r}, simulate={self.config.simulate}"


register_layer("fp8-tensorwise", Float8Linear, "fp8 in all three matmuls, one scale per tensor", recipe="tensorwise")
register_layer(
    "fp8-switchback", Float8Linear, "fp8 forward and grad-input, rows of x and g scaled, high-precision grad_weight",
    recipe="switchback",
)
