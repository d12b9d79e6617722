"""LowbitMultiheadAttention computes what nn.MultiheadAttention computes, masks and layouts included."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn import LowbitLinear, LowbitMultiheadAttention
from tests.reference import sqnr_db

SWAP_ALL = {"filter_fn": lowbit.ALL}


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


class CountingLinear(FloatLinear):
    """FloatLinear that counts the matmuls it runs (to see that nothing went around it)."""

    calls = 0

    def linear(self, input, weight, bias):
        CountingLinear.calls += 1
        return super().linear(input, weight, bias)


LAYOUTS = {
    "kdim_vdim": dict(kdim=16, vdim=24),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "all": dict(kdim=16, vdim=24, add_bias_kv=True, add_zero_attn=True, bias=False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("need_weights", [False, True])
def test_every_layout_is_wrapped_and_matches_torch(layout, need_weights):
    torch.manual_seed(0)
    kwargs = LAYOUTS[layout]
    mha = nn.MultiheadAttention(32, 4, batch_first=True, **kwargs).eval()
    wrapped = lowbit.swap(nn.ModuleList([mha]), CountingLinear, **SWAP_ALL)[0]
    assert isinstance(wrapped, nn.MultiheadAttention) and isinstance(wrapped, LowbitMultiheadAttention)
    for name in ("kdim", "vdim", "bias_k", "bias_v", "add_zero_attn", "_qkv_same_embed_dim", "q_proj_weight"):
        assert hasattr(wrapped, name)
    assert wrapped.state_dict().keys() == mha.state_dict().keys()
    q = torch.randn(2, 5, 32)
    k = torch.randn(2, 7, kwargs.get("kdim", 32))
    v = torch.randn(2, 7, kwargs.get("vdim", 32))
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, -2:] = True
    CountingLinear.calls = 0
    out, w = wrapped(q, k, v, key_padding_mask=padding, need_weights=need_weights)
    ref, ref_w = mha(q, k, v, key_padding_mask=padding, need_weights=need_weights)
    assert CountingLinear.calls == 4  # q, k, v and the output projection
    assert_same(out, ref)
    if need_weights:
        assert_same(w, ref_w)
    assert lowbit.unswap(nn.ModuleList([wrapped]))[0].__class__ is nn.MultiheadAttention


def test_attention_weights_are_returned_after_dropout_as_torch_does():
    mha = nn.MultiheadAttention(32, 4, dropout=0.5, batch_first=True).train()
    wrapped = LowbitMultiheadAttention.from_mha(mha, FloatLinear)
    x = torch.randn(2, 6, 32)
    torch.manual_seed(1)
    ref, ref_w = mha(x, x, x, average_attn_weights=False)
    torch.manual_seed(1)
    out, w = wrapped(x, x, x, average_attn_weights=False)
    assert (ref_w == 0).any()  # dropped entries are visible in torch's weights
    assert_same(w, ref_w)
    assert_same(out, ref)


def test_is_causal_without_a_mask_raises_as_torch_does():
    mha, wrapped = pair()
    x = torch.randn(2, 6, 32)
    with pytest.raises(RuntimeError) as torch_error:
        mha(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError) as ours:
        wrapped(x, x, x, is_causal=True)
    assert str(ours.value) == str(torch_error.value)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, -1] = True
    mask, mask_type = wrapped.merge_masks(None, padding, x)  # inherited, as nn.Transformer* call it
    ref_mask, ref_type = mha.merge_masks(None, padding, x)
    assert mask_type == ref_type and torch.equal(mask, ref_mask)


@pytest.mark.parametrize("grad", [False, True])
def test_eval_fast_path_never_runs_a_swapped_attention(grad):
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    wrapped = LowbitMultiheadAttention.from_mha(mha, CountingLinear)
    x = torch.randn(2, 6, 32)
    CountingLinear.calls = 0
    with torch.set_grad_enabled(grad):
        out, _ = wrapped(x, x, x, need_weights=False)
        ref, _ = mha(x, x, x, need_weights=False)
    assert CountingLinear.calls == 2  # packed in_proj + out_proj: the fused kernel did not run
    assert_same(out, ref)


def _encoder_layer(cls=nn.TransformerEncoderLayer):
    torch.manual_seed(0)
    return cls(32, 4, dim_feedforward=48, dropout=0.0, batch_first=True).eval()


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("which", ["all", "ffn_only"])
def test_transformer_encoder_layers_never_take_the_fused_path(grad, which):
    layer = _encoder_layer()
    encoder = nn.TransformerEncoder(_encoder_layer(), num_layers=2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 6, 32)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -2:] = True
    with torch.no_grad():
        ref_layer = layer(x, src_key_padding_mask=padding)
    keep = SWAP_ALL["filter_fn"] if which == "all" else (lambda m, n: n.startswith("linear") or ".linear" in n)
    swapped = lowbit.swap(layer, CountingLinear, filter_fn=keep)
    swapped_encoder = lowbit.swap(encoder, CountingLinear, filter_fn=keep)
    assert isinstance(swapped, nn.TransformerEncoderLayer) and type(swapped) is not nn.TransformerEncoderLayer
    per_layer = 4 if which == "all" else 2
    CountingLinear.calls = 0
    with torch.set_grad_enabled(grad):
        out = swapped(x, src_key_padding_mask=padding)
    assert CountingLinear.calls == per_layer
    # torch's own layer in eval takes its fused path, which returns the same numbers here.
    assert_same(out, ref_layer, atol=1e-4)
    CountingLinear.calls = 0
    with torch.set_grad_enabled(grad):
        encoded = swapped_encoder(x, src_key_padding_mask=padding)
    assert CountingLinear.calls == 2 * per_layer and not encoded.is_nested
    restored = lowbit.unswap(swapped_encoder)
    assert type(restored) is nn.TransformerEncoder and type(restored.layers[0]) is nn.TransformerEncoderLayer


def test_transformer_decoder_layer_swapped_in_full():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=True).eval()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    ref = layer(x, memory)
    swapped = lowbit.swap(layer, CountingLinear, **SWAP_ALL)
    CountingLinear.calls = 0
    out = swapped(x, memory)
    assert CountingLinear.calls == 2 + 4 + 2  # self-attention (packed, out), cross (q, k, v, out), FFN
    assert_same(out, ref, atol=1e-4)


@pytest.mark.parametrize(("name", "floors"), [
    ("switchback-row", (30, 30, 28)), ("fp8-switchback", (20, 18, 15)),
    # seen: mxfp8 34.7/26.5/19.7, fp8-blockwise 37.7/30.2/23.0, mxfp8-e5m2 30.8/25.1/17.9,
    # mxfp4 24.1/20.1/12.4, nvfp4 25.9/21.0/13.5 dB
    ("mxfp8", (31, 23, 16)), ("fp8-blockwise", (34, 27, 20)), ("mxfp8-e5m2", (27, 22, 15)),
    ("mxfp4", (21, 17, 9)), ("nvfp4", (22, 18, 10)),
])
def test_swapped_transformer_layer_at_a_realistic_width(name, floors):
    """module_db's Transformer samples are 3-4 wide (its floors are loose); at width 64 the same
    layer holds output, input-gradient and parameter-gradient SQNR floors against fp64."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    ref_layer = copy.deepcopy(layer).double()
    kwargs = {"simulate": True} if name in ("fp8-switchback", "fp8-tensorwise") else {}
    swapped = lowbit.swap(layer, name, filter_fn=lowbit.ALL, **kwargs)
    x, g = torch.randn(4, 16, 64), torch.randn(4, 16, 64)
    xs, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    out, ref = swapped(xs), ref_layer(xr)
    out.backward(g)
    ref.backward(g.double())
    params = torch.cat([p.grad.flatten() for p in swapped.parameters()])
    ref_params = torch.cat([p.grad.flatten() for p in ref_layer.parameters()])
    got = (sqnr_db(ref, out), sqnr_db(xr.grad, xs.grad), sqnr_db(ref_params, params))
    assert all(db >= floor for db, floor in zip(got, floors)), got
