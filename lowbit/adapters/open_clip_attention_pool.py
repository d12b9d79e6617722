"""open_clip's ModifiedResNet AttentionPool2d (RN50 ...): its q/k/v/c_proj Linears are read by
F.multi_head_attention_forward as raw weights, so swapped projections never run.

The adapted forward calls the four Linears themselves (swapped or not) and attends with
F.scaled_dot_product_attention. Only the pooled query (token 0) is returned by the original, so only
it is projected and attended; the keys and values are all tokens, as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.adapters.base import Adapted, adapt

TARGETS = ("open_clip.modified_resnet:AttentionPool2d",)


class _PoolThroughModules(Adapted):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x = x.reshape(n, c, -1).permute(0, 2, 1)  # NCHW -> N(HW)C
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # N(HW+1)C
        x = x + self.positional_embedding[None].to(x.dtype)
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (N, L, C) -> (N, heads, L, C / heads)
            return t.reshape(n, t.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(self.q_proj(x[:, :1])), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as MHA's
        return self.c_proj(out.transpose(1, 2).reshape(n, c))


def applies(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj", "c_proj"))


def default_keep(module: nn.Module, min_features: int) -> bool:
    return True  # re-routes the forward only; each projection has its own filter call


def convert(module: nn.Module, cls, kwargs) -> nn.Module:
    return adapt(module, _PoolThroughModules)
