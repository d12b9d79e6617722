"""nn.MultiheadAttention with both projections through a lowbit linear, state_dict keys unchanged.

nn.MultiheadAttention keeps its q/k/v projection as the raw Parameter `in_proj_weight` and calls
F.linear on it inside F.multi_head_attention_forward, so swapping `out_proj` alone would leave
three quarters of the attention FLOPs in 16-bit. This module redoes that forward with the same
Parameters, the input projection through `out_proj.linear` and the attention itself through
F.scaled_dot_product_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn.base import LowbitLinear, stash_without_parameters


def can_wrap(mha: nn.MultiheadAttention) -> bool:
    """Whether `mha` has the common layout this module covers (one packed in_proj_weight, no bias_k/v)."""
    return mha._qkv_same_embed_dim and mha.in_proj_weight is not None and mha.bias_k is None and not mha.add_zero_attn


def _merge_masks(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, heads: int, dtype
) -> torch.Tensor | None:
    """One additive float mask (B, H or 1, L, S) from MHA's masks, where True means "do not attend"."""

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
        return mask.to(dtype)

    merged = None
    if attn_mask is not None:
        merged = additive(attn_mask)
        if merged.dim() == 3:  # (B * H, L, S)
            merged = merged.view(batch, heads, *merged.shape[1:])
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(batch, 1, 1, -1)
        merged = padding if merged is None else merged + padding
    return merged


class LowbitMultiheadAttention(nn.Module):
    """Self- or cross-attention as nn.MultiheadAttention computes it (same arguments and returns),
    with q/k/v and output projections in low precision through `out_proj.linear`.

    Build it with `from_mha`; it shares the original module's Parameters.
    """

    def __init__(self, mha: nn.MultiheadAttention, out_proj: LowbitLinear) -> None:
        super().__init__()
        if not can_wrap(mha):
            raise ValueError(
                "LowbitMultiheadAttention covers nn.MultiheadAttention with kdim == vdim == embed_dim, "
                "no bias_k/bias_v and add_zero_attn=False"
            )
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first
        self._qkv_same_embed_dim = True
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = out_proj
        self.train(mha.training)
        object.__setattr__(self, "_lowbit_original", stash_without_parameters(mha))

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, linear_cls: type[LowbitLinear], **kwargs):
        return cls(mha, linear_cls.from_linear(mha.out_proj, **kwargs))

    def to_original(self) -> nn.MultiheadAttention:
        """An nn.MultiheadAttention of the class this was built from, holding this module's Parameters."""
        mha = self.__dict__["_lowbit_original"]
        mha.in_proj_weight = self.in_proj_weight
        mha.in_proj_bias = self.in_proj_bias
        mha.out_proj = self.out_proj.to_original()
        mha.train(self.training)
        return mha

    def _project(self, query, key, value):
        linear = self.out_proj.linear
        if query is key and key is value:  # one packed (3E, E) projection
            return linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        return [linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases)]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self_attention = query is key and key is value
        unbatched = query.dim() == 2
        batch_dim = 0 if self.batch_first else 1

        def to_batch_first(t: torch.Tensor) -> torch.Tensor:
            t = t.unsqueeze(batch_dim) if unbatched else t  # (L, E): a batch of one, as nn.MHA does
            return t if self.batch_first else t.transpose(0, 1)

        query = to_batch_first(query)
        # Self-attention keeps one shared tensor, so the packed projection runs as one GEMM.
        key, value = (query, query) if self_attention else (to_batch_first(key), to_batch_first(value))
        if unbatched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)

        q, k, v = self._project(query, key, value)
        batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = _merge_masks(attn_mask, key_padding_mask, batch, self.num_heads, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        causal = is_causal and mask is None

        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
            if causal:
                causal_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril_()
                scores = scores.masked_fill(~causal_mask, float("-inf"))
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p=dropout_p) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)

        out = self.out_proj(out.transpose(1, 2).reshape(batch, q_len, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(batch_dim)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
