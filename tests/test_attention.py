"""LowbitMultiheadAttention computes what nn.MultiheadAttention computes, masks and layouts included."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn import LowbitLinear, LowbitMultiheadAttention
from tests.reference import sqnr_db

SWAP_ALL = {"filter_fn": lambda module, name: True}


class FloatLinear(LowbitLinear):
    """Plain F.linear: isolates the attention wrapper's own arithmetic from int8 error."""

    def linear(self, input, weight, bias):
        return F.linear(input, weight, bias)


def pair(batch_first=True, embed=32, heads=4):
    mha = nn.MultiheadAttention(embed, heads, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    wrapped = LowbitMultiheadAttention.from_mha(mha, FloatLinear)
    return mha, wrapped


def assert_same(a, b, atol=1e-5):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_outputs_and_weights(batch_first):
    mha, wrapped = pair(batch_first)
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    for need_weights, average in [(False, True), (True, True), (True, False)]:
        ref, ref_w = mha(x, x, x, need_weights=need_weights, average_attn_weights=average)
        out, w = wrapped(x, x, x, need_weights=need_weights, average_attn_weights=average)
        assert_same(out, ref)
        if need_weights:
            assert_same(w, ref_w)
        else:
            assert w is None and ref_w is None


def test_cross_attention_and_masks():
    mha, wrapped = pair()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    causal_bool = torch.ones(5, 9, dtype=torch.bool).triu(1)
    float_mask = torch.randn(2 * 4, 5, 9)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, -3:] = True
    for kwargs in [
        {},
        {"attn_mask": causal_bool},
        {"attn_mask": float_mask},
        {"key_padding_mask": padding},
        {"attn_mask": causal_bool, "key_padding_mask": padding},
    ]:
        ref, _ = mha(q, kv, kv, need_weights=False, **kwargs)
        out, _ = wrapped(q, kv, kv, need_weights=False, **kwargs)
        assert_same(out, ref)


def test_causal_hint_unbatched_and_gradients():
    mha, wrapped = pair()
    x = torch.randn(6, 32)  # unbatched (L, E)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    ref, _ = mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    out, _ = wrapped(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    assert_same(out, ref)

    x = torch.randn(2, 6, 32, requires_grad=True)
    ref_grads = torch.autograd.grad(mha(x, x, x)[0].square().sum(), [x, mha.in_proj_weight])
    grads = torch.autograd.grad(wrapped(x, x, x)[0].square().sum(), [x, wrapped.in_proj_weight])
    for a, b in zip(grads, ref_grads):
        assert_same(a, b, atol=1e-4)


def test_switchback_attention_close_to_float():
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(2, 9, 64)
    ref, _ = mha(x, x, x, need_weights=False)
    model = lowbit.swap(nn.ModuleDict({"attn": mha}), **SWAP_ALL)
    assert isinstance(model["attn"], LowbitMultiheadAttention)
    out, _ = model["attn"](x, x, x, need_weights=False)
    assert sqnr_db(ref, out) >= 30


def test_unsupported_layouts_are_left_alone():
    odd = nn.MultiheadAttention(32, 4, kdim=16, vdim=16)
    with_bias_kv = nn.MultiheadAttention(32, 4, add_bias_kv=True)
    model = lowbit.swap(nn.ModuleList([odd, with_bias_kv]), **SWAP_ALL)
    assert model[0] is odd and model[1] is with_bias_kv
