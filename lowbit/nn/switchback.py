"""SwitchBackLinear: an nn.Linear whose forward and grad_input matmuls run in int8."""

from __future__ import annotations

import torch

from lowbit.int8.config import SwitchBackConfig
from lowbit.int8.functional import FrozenInt8Weight, switchback_linear
from lowbit.nn.base import LowbitLinear
from lowbit.registry import register_layer


class SwitchBackLinear(LowbitLinear):
    """Drop-in nn.Linear with SwitchBack int8 matmuls (Wortsman, Dettmers et al. 2023).

    Forward x @ w.T and grad_input g @ w run in int8 with row-wise x and g; the weight gradient
    runs in the input's dtype. On CUDA the int8 work runs in Triton kernels, elsewhere in a
    plain-torch reference with the same numerics (see `lowbit.int8.ops`).

    Args:
        in_features, out_features, bias, device, dtype: as for nn.Linear.
        weight_quant: "tensor" (the paper's default) or "row" (vectorwise).
        mem_efficient: save int8 x for backward instead of x.
        grad_weight: "high" (SwitchBack: the input's dtype) or "int8" (the paper's LLM.int8()
            baseline, which loses accuracy at scale).

    The int8 weight is made again at every call, so any change to the weight is seen. For
    inference with weights that no longer change, `freeze_weight()` keeps one int8 copy (see
    `FrozenInt8Weight` for what it watches); `train()` and `unfreeze_weight()` drop it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_quant: str = "tensor",
        mem_efficient: bool = False,
        grad_weight: str = "high",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = SwitchBackConfig(weight_quant=weight_quant, mem_efficient=mem_efficient, grad_weight=grad_weight)
        self._frozen_weight: FrozenInt8Weight | None = None

    def linear(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return switchback_linear(input, weight, bias, config=self.config, frozen_weight=self._frozen_weight)

    def freeze_weight(self) -> SwitchBackLinear:
        """Promise that the weight will not change: its int8 copy is made once and reused.

        Any write through the Parameter (optimizer step, `copy_`, `load_state_dict`), a new
        Parameter or storage, and `train()` end the promise; an in-place write to `weight.data`
        cannot be seen, so call this again after one.
        """
        self._frozen_weight = FrozenInt8Weight(self.weight, self.config)
        return self

    def unfreeze_weight(self) -> SwitchBackLinear:
        self._frozen_weight = None
        return self

    @property
    def weight_frozen(self) -> bool:
        """Whether a current int8 copy of the weight is being reused."""
        return self._frozen_weight is not None and self._frozen_weight.is_current(self.weight)

    def train(self, mode: bool = True) -> SwitchBackLinear:
        if mode:  # training changes the weight: the frozen copy would go stale
            self._frozen_weight = None
        return super().train(mode)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, weight_quant={self.config.weight_quant!r}, "
            f"mem_efficient={self.config.mem_efficient}, grad_weight={self.config.grad_weight!r}"
        )


register_layer("switchback", SwitchBackLinear, "int8 forward and grad-input, tensor-wise weight (the paper's)")
register_layer("switchback-row", SwitchBackLinear, "int8, row-wise weight (vectorwise)", weight_quant="row")
register_layer(
    "switchback-memeff", SwitchBackLinear, "int8, saves the int8 input for backward", mem_efficient=True
)
register_layer(
    "llm-int8", SwitchBackLinear, "int8 in all three matmuls (the paper's LLM.int8() baseline)",
    weight_quant="row", grad_weight="int8",
)
