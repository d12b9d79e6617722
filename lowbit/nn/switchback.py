"""SwitchBackLinear: an nn.Linear whose forward and grad_input matmuls run in int8."""

from __future__ import annotations

import torch

from lowbit.config import SwitchBackConfig
from lowbit.functional import Int8WeightCache, switchback_linear
from lowbit.nn.base import LowbitLinear


class SwitchBackLinear(LowbitLinear):
    """Drop-in nn.Linear with SwitchBack int8 matmuls (Wortsman, Dettmers et al. 2023).

    Forward x @ w.T and grad_input g @ w run in int8 with row-wise x and g; the weight gradient
    runs in the input's dtype. On CUDA the int8 work runs in Triton kernels, elsewhere in a
    plain-torch reference with the same numerics (see `lowbit.ops`).

    Args:
        in_features, out_features, bias, device, dtype: as for nn.Linear.
        weight_quant: "tensor" (the paper's default) or "row" (vectorwise).
        mem_efficient: save int8 x for backward instead of x.

    In eval mode without autograd (torch.no_grad, inference_mode) the int8 weight is computed once
    and reused until the weight changes; train() and eval() drop it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_quant: str = "tensor",
        mem_efficient: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = SwitchBackConfig(weight_quant=weight_quant, mem_efficient=mem_efficient)
        self._weight_cache = Int8WeightCache()

    def linear(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Only an eval-mode layer's own weight is cached; borrowed weights are quantized per call.
        cache = self._weight_cache if weight is self.weight and not self.training else None
        return switchback_linear(input, weight, bias, config=self.config, weight_cache=cache)

    def train(self, mode: bool = True) -> SwitchBackLinear:
        # Entering or leaving eval drops the int8 copy: it may be stale, and training has no use for it.
        self._weight_cache.clear()
        return super().train(mode)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, weight_quant={self.config.weight_quant!r}, "
            f"mem_efficient={self.config.mem_efficient}"
        )
