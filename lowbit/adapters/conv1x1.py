"""A 1x1 nn.Conv2d with groups=1 and no padding is a matmul over channels: out[n, :, h, w] =
W @ x[n, :, h, w] + b (a stride picks every s-th pixel first). The adapted forward runs it as
F.linear on (pixels, channels) rows through a lowbit layer.

Layout cost: the rows are the channels-last view of x. A channels_last input is already in that
layout (no copy); an NCHW-contiguous one is copied once. The output is returned as the
channels-last result viewed as NCHW (no copy), so a following 1x1 conv reads it without one. This
is on by default: `default_filter` applies the same width rule as for Linears (both channel counts
>= MIN_FEATURES), where the GEMM outweighs one pass over the activation.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.adapters.base import Adapted, adapt, engine_linear, make_engine

TARGETS = ("torch.nn.modules.conv:Conv2d",)


class _Conv1x1Lowbit(Adapted):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        sh, sw = self.stride
        if (sh, sw) != (1, 1):
            x = x[:, :, ::sh, ::sw]
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        out = engine_linear(self, rows, self.weight.view(self.out_channels, c), self.bias)
        out = out.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)
        return out.squeeze(0) if unbatched else out


def applies(module: nn.Module) -> bool:
    return (
        tuple(module.kernel_size) == (1, 1)
        and module.groups == 1
        and module.padding in ((0, 0), "valid")
        and module.padding_mode == "zeros"
    )


def default_keep(module: nn.Module, min_features: int) -> bool:
    return min(module.in_channels, module.out_channels) >= min_features


def convert(module: nn.Module, cls, kwargs) -> nn.Module:
    engine = make_engine(cls, kwargs, module.in_channels, module.out_channels, module.weight.dtype)
    return adapt(module, _Conv1x1Lowbit, engine)
