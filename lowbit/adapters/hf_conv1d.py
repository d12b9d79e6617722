"""Hugging Face `Conv1D` (GPT-2, GPT, ...): a linear layer whose weight is stored transposed,
(in_features, out_features), and applied as addmm(bias, x, weight). The adapted forward runs
F.linear(x, weight.T, bias) through a lowbit layer; the stored weight is untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.adapters.base import Adapted, adapt, engine_linear, make_engine

TARGETS = ("transformers.pytorch_utils:Conv1D", "transformers.modeling_utils:Conv1D")


class _Conv1DLowbit(Adapted):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return engine_linear(self, x, self.weight.t(), self.bias)


def applies(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() == 2


def default_keep(module: nn.Module, min_features: int) -> bool:
    return min(module.weight.shape) >= min_features


def convert(module: nn.Module, cls, kwargs) -> nn.Module:
    in_features, out_features = module.weight.shape
    return adapt(module, _Conv1DLowbit, make_engine(cls, kwargs, in_features, out_features, module.weight.dtype))
