"""Configuration of the SwitchBack int8 layers: the options that travel together, checked once."""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT_QUANTS = ("tensor", "row")
GRAD_WEIGHTS = ("high", "int8")


@dataclass(frozen=True)
class SwitchBackConfig:
    """How a SwitchBack layer quantizes.

    Attributes:
        weight_quant: "tensor" (one absmax for the whole weight: the paper's SwitchBack) or "row"
            (one absmax per output row in the forward and per input column in grad_input:
            the paper's "vectorwise" variant).
        mem_efficient: save int8 x and its row scales for backward instead of x (half the
            activation memory in bf16); the weight gradient is then taken against the dequantized x.
        grad_weight: the precision of the weight gradient g.T @ x: "high" (the input's dtype:
            SwitchBack) or "int8" (g.T and x scaled per feature over the tokens, as the paper's
            LLM.int8() baseline; its inner dimension is batch x sequence, where int8 error piles up).
    """

    weight_quant: str = "tensor"
    mem_efficient: bool = False
    grad_weight: str = "high"

    def __post_init__(self) -> None:
        if self.weight_quant not in WEIGHT_QUANTS:
            raise ValueError(f"weight_quant must be one of {WEIGHT_QUANTS}, got {self.weight_quant!r}")
        if not isinstance(self.mem_efficient, bool):
            raise ValueError(f"mem_efficient must be a bool, got {self.mem_efficient!r}")
        if self.grad_weight not in GRAD_WEIGHTS:
            raise ValueError(f"grad_weight must be one of {GRAD_WEIGHTS}, got {self.grad_weight!r}")
