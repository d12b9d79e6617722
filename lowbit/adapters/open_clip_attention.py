"""open_clip's custom `Attention` (qk_norm, scaled_cosine, scale_heads, inner_norm configs): its
q/k/v projection is the raw Parameter `in_proj_weight`, read by F.linear in its forward.

The adapted forward is the original's with that F.linear run by a lowbit layer; `out_proj` is an
nn.Linear child and is swapped on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.adapters.base import Adapted, adapt, engine_linear, make_engine

TARGETS = ("open_clip.transformer:Attention",)


def _additive(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(attn_mask, float("-inf"))
    return attn_mask.to(dtype=dtype)


class _InProjLowbit(Adapted):
    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, length, c = x.shape
        q, k, v = engine_linear(self, x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None:
            if attn_mask.ndim == 3:  # (N * heads, L, L)
                attn_mask = attn_mask.reshape(n, self.num_heads, length, length)
            attn_mask = _additive(attn_mask, q.dtype)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if self.logit_scale is not None:  # scaled cosine attention
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
            attn = attn * torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
            if attn_mask is not None:
                attn = attn + attn_mask
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        else:
            q, k = self.ln_q(q), self.ln_k(k)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        if self.head_scale is not None:
            x = x * self.head_scale
        x = self.ln_inner(x.transpose(1, 2).reshape(n, length, c))
        return self.out_drop(self.out_proj(x))


def applies(module: nn.Module) -> bool:
    return isinstance(getattr(module, "in_proj_weight", None), nn.Parameter) and module.in_proj_weight.dim() == 2


def default_keep(module: nn.Module, min_features: int) -> bool:
    return min(module.in_proj_weight.shape) >= min_features


def convert(module: nn.Module, cls, kwargs) -> nn.Module:
    out_features, in_features = module.in_proj_weight.shape
    engine = make_engine(cls, kwargs, in_features, out_features, module.in_proj_weight.dtype)
    return adapt(module, _InProjLowbit, engine)
