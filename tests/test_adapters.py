"""Each adapter on its own: the layer it converts, its numerics against fp64, unswap, and the
coverage / first-call warning for a weight read around a swapped layer's forward."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.adapters import find_adapter, is_adapted
from lowbit.swap import default_filter


def sqnr(got, exact):
    got, exact = got.detach().double(), exact.detach().double()
    return 10 * math.log10(exact.square().sum() / (got.double() - exact).square().sum())


def swap_all(model, **kwargs):
    return lowbit.swap(model, filter_fn=lambda m, n: True, **kwargs)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv1x1_is_a_matmul_over_channels(stride, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 40, 1, stride=stride)
    x = torch.randn(2, 48, 7, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride=stride)
    model = swap_all(nn.Sequential(conv))
    assert is_adapted(model[0]) and isinstance(model[0], nn.Conv2d)
    out = model(x)
    assert out.shape == exact.shape and sqnr(out, exact) >= 30
    assert sqnr(model[0](x[0]), exact[0]) >= 30  # unbatched
    out.sum().backward()
    assert conv.weight.grad.shape == conv.weight.shape
    lowbit.unswap(model)
    assert type(model[0]) is nn.Conv2d
    torch.testing.assert_close(model(x), F.conv2d(x, conv.weight, conv.bias, stride=stride))


def test_conv_other_than_1x1_is_left_alone():
    for conv in (nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 8, 1, padding=1)):
        assert find_adapter(conv) is None
    assert not default_filter(nn.Conv2d(256, 1024, 1), "c") and default_filter(nn.Conv2d(512, 1024, 1), "c")


def test_hf_conv1d():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    layer = pytorch_utils.Conv1D(nf=24, nx=40)
    nn.init.normal_(layer.bias)
    x = torch.randn(3, 5, 40)
    exact = x.double() @ layer.weight.double() + layer.bias.double()
    keys = list(layer.state_dict())
    swapped = swap_all(layer)
    assert swapped is layer and isinstance(layer, pytorch_utils.Conv1D) and list(layer.state_dict()) == keys
    assert sqnr(layer(x), exact) >= 30
    report = lowbit.coverage(layer, x)
    assert report.low_precision_fraction == 1.0 and report.layers[0].name == "weight"
    lowbit.unswap(layer)
    assert type(layer) is pytorch_utils.Conv1D


def test_open_clip_attention_and_text_projection():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    # qk_norm: both towers' blocks use open_clip's custom Attention (its scaled-cosine branch fails in
    # open_clip itself: bmm on 4-D q/k)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "qk_norm": True},
        text_cfg={"context_length": 8, "vocab_size": 50, "width": 64, "heads": 2, "layers": 1,
                  "qk_norm": True},
    ).eval()
    image, text = torch.randn(2, 3, 32, 32), torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        ref_image, ref_text = model.encode_image(image, normalize=True), model.encode_text(text, normalize=True)
    swap_all(model)
    assert is_adapted(model.visual.transformer.resblocks[0].attn)
    report = lowbit.coverage(model, image, text, backward=True)
    assert report.low_precision_fraction >= 0.99, str(report)
    with torch.no_grad():
        image_features, text_features = model.encode_image(image, normalize=True), model.encode_text(text, True)
    assert F.cosine_similarity(image_features, ref_image).min() > 0.995
    assert F.cosine_similarity(text_features, ref_text).min() > 0.995
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(2))  # normalize after the projection
    lowbit.unswap(model)
    assert type(model).__name__ == "CLIP" and not any(is_adapted(m) for m in model.modules())


class ReadsChildWeight(nn.Module):
    """Calls F.linear on its child's weight, as timm's beit attention does."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(32, 32)
        self.outer = nn.Linear(32, 16)

    def forward(self, x):
        return self.outer(F.linear(x, self.inner.weight, self.inner.bias))


def test_a_weight_read_around_its_layer_is_reported():
    torch.manual_seed(0)
    model = swap_all(ReadsChildWeight())
    x = torch.randn(4, 32)
    with pytest.warns(UserWarning, match=r"1 of 2 swapped layers.*\(inner\)"):
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once only
    report = lowbit.coverage(model, x)
    by_name = {layer.name: layer for layer in report.layers}
    assert not by_name["inner.weight"].ran and by_name["inner.weight"].format == "float32"
    assert by_name["outer.weight"].ran and by_name["outer.weight"].sqnr_db > 30
    assert report.low_precision_fraction == pytest.approx(16 / 48)
    assert "inner.weight" in str(report) and report.to_dict()["layers"][0]["name"] == "inner.weight"


def test_coverage_counts_fp8_simulated_and_leaves_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    swap_all(model, to="fp8-switchback", simulate=True)
    x = torch.randn(5, 32, requires_grad=True)
    report = lowbit.coverage(model, x, backward=True)
    assert report.low_precision_fraction == 1.0
    assert {layer.format for layer in report.layers} == {"fp8"}
    assert all(layer.grad_sqnr_db is not None and layer.grad_sqnr_db > 15 for layer in report.layers)
    assert all(p.grad is None for p in model.parameters()) and x.grad is None
    # forward 2*5*32*64 + 2*5*64*8, and as much again for grad_input
    assert report.flops == 2 * (2 * 5 * 32 * 64 + 2 * 5 * 64 * 8)
