"""BlockScaledLinear: an nn.Linear whose matmuls run in a block-scaled format (MX, NVFP4, fp8
blockwise), simulated in plain torch on any device."""

from __future__ import annotations

import torch

from lowbit.mx.config import BlockConfig
from lowbit.mx.functional import block_linear
from lowbit.nn.base import LowbitLinear
from lowbit.registry import register_layer


class BlockScaledLinear(LowbitLinear):
    """Drop-in nn.Linear with block-scaled forward and grad-input GEMMs (rules in lowbit.mx.ops).

    Args:
        in_features, out_features, bias, device, dtype: as for nn.Linear.
        format: "mxfp8" (e4m3, 32-blocks, E8M0 scales), "mxfp8-e5m2", "mxfp4" (e2m1), "nvfp4"
            (e2m1, 16-blocks, e4m3 block scales over an fp32 tensor scale) or "fp8-blockwise"
            (e4m3, fp32 scales per 1x128 activation tile and 128x128 weight block).
        grad_weight: "high" (the weight gradient in the input's dtype) or "format".
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        format: str = "mxfp8",
        grad_weight: str = "high",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = BlockConfig(format=format, grad_weight=grad_weight)

    def linear(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return block_linear(input, weight, bias, config=self.config)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.config.format!r}, grad_weight={self.config.grad_weight!r}"


register_layer("mxfp8", BlockScaledLinear, "MX fp8 (e4m3, 32-blocks, E8M0 scales), simulated", format="mxfp8")
register_layer("mxfp8-e5m2", BlockScaledLinear, "MX fp8 with e5m2 elements, simulated", format="mxfp8-e5m2")
register_layer("mxfp4", BlockScaledLinear, "MX fp4 (e2m1, 32-blocks, E8M0 scales), simulated", format="mxfp4")
register_layer(
    "nvfp4", BlockScaledLinear, "NVFP4 (e2m1, 16-blocks, e4m3 scales over an fp32 tensor scale), simulated",
    format="nvfp4",
)
register_layer(
    "fp8-blockwise", BlockScaledLinear, "e4m3, fp32 scales per 1x128 activation tile / 128x128 weight block, simulated",
    format="fp8-blockwise",
)
