"""Zero-init layer-scale helpers and FeatureProbe on small open_clip and timm models."""

import pytest
import torch
from torch import nn

import lowbit

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
OpenClipLayerScale = open_clip.transformer.LayerScale
VisionTransformer = open_clip.transformer.VisionTransformer
TimmLayerScale = timm.layers.LayerScale


def small_open_clip_vit(ls_init_value=None):
    return VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0,
        ls_init_value=ls_init_value, output_dim=32,
    )


def small_open_clip_clip(ls_init_value=None):
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg={
            "image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16,
            "ls_init_value": ls_init_value,
        },
        text_cfg={
            "context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2,
            "ls_init_value": ls_init_value,
        },
    )


def small_timm_vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10, **kwargs)


def open_clip_slots(model):
    return [m for block in model.transformer.resblocks for m in (block.ls_1, block.ls_2)]


def timm_slots(model):
    return [m for block in model.blocks for m in (block.ls1, block.ls2)]


def assert_zero_trainable_and_reached_by_grads(model, slots, cls, loss):
    assert len(slots) == 4
    for ls in slots:
        assert isinstance(ls, cls), f"{type(ls).__name__} is not a LayerScale"
        assert isinstance(ls.gamma, nn.Parameter) and ls.gamma.requires_grad
        assert torch.equal(ls.gamma, torch.zeros_like(ls.gamma))
    loss().backward()
    for ls in slots:
        assert ls.gamma.grad is not None and ls.gamma.grad.abs().sum() > 0


def test_open_clip_zero_init():
    model = small_open_clip_vit(ls_init_value=1e-5)
    assert lowbit.zero_init_layer_scale(model) is model
    x = torch.randn(2, 3, 32, 32)
    assert_zero_trainable_and_reached_by_grads(
        model, open_clip_slots(model), OpenClipLayerScale, lambda: model(x).square().sum()
    )
    # With gamma = 0 every block is the identity: x + 0 * attn(...) + 0 * mlp(...).
    tokens = torch.randn(2, 17, 64)
    assert torch.equal(model.transformer(tokens), tokens)


def test_timm_zero_init_survives_reset_parameters():
    model = small_timm_vit(init_values=1e-5)
    lowbit.zero_init_layer_scale(model)
    slots = timm_slots(model)
    for ls in slots:
        assert ls.init_values == 0.0
        ls.reset_parameters()  # what timm's init_weights(needs_reset=True) calls
    x = torch.randn(2, 3, 32, 32)
    assert_zero_trainable_and_reached_by_grads(model, slots, TimmLayerScale, lambda: model(x).square().sum())


def test_init_value_zero_means_no_layer_scale_then_add_it():
    """timm reads init_values=0.0 as 'none' (falsy check): zero_init says so, add_layer_scale adds it."""
    model = small_timm_vit(init_values=0.0)
    assert all(isinstance(m, nn.Identity) for m in timm_slots(model))
    with pytest.raises(ValueError, match="add_layer_scale"):
        lowbit.zero_init_layer_scale(model)
    keys = set(model.state_dict())
    assert lowbit.add_layer_scale(model) is model
    assert set(model.state_dict()) - keys == {f"blocks.{i}.ls{j}.gamma" for i in range(2) for j in (1, 2)}
    assert all(m.gamma.shape == (192,) for m in timm_slots(model))
    x = torch.randn(2, 3, 32, 32)
    assert_zero_trainable_and_reached_by_grads(
        model, timm_slots(model), TimmLayerScale, lambda: model(x).square().sum()
    )


def test_open_clip_add_layer_scale_dim_device_dtype():
    model = small_open_clip_vit(ls_init_value=None).to(torch.bfloat16)
    assert all(isinstance(m, nn.Identity) for m in open_clip_slots(model))
    keys = set(model.state_dict())
    lowbit.add_layer_scale(model)
    added = set(model.state_dict()) - keys
    assert added == {f"transformer.resblocks.{i}.ls_{j}.gamma" for i in range(2) for j in (1, 2)}
    for ls in open_clip_slots(model):
        assert ls.gamma.shape == (64,) and ls.gamma.dtype == torch.bfloat16 and ls.gamma.device.type == "cpu"
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    assert_zero_trainable_and_reached_by_grads(
        model, open_clip_slots(model), OpenClipLayerScale, lambda: model(x).float().square().sum()
    )
    # A second call leaves existing layer-scale alone; a non-zero init is taken as given.
    with torch.no_grad():
        model.transformer.resblocks[0].ls_1.gamma.fill_(0.5)
    lowbit.add_layer_scale(model)
    assert model.transformer.resblocks[0].ls_1.gamma.eq(0.5).all()
    other = lowbit.add_layer_scale(small_open_clip_vit(), init=0.1)
    assert all(m.gamma.eq(0.1).all() for m in open_clip_slots(other))


def test_open_clip_clip_both_towers_and_fp8_swap():
    model = small_open_clip_clip(ls_init_value=1e-5)
    lowbit.zero_init_layer_scale(model)
    names = [n for n, _ in lowbit.layer_scale.layer_scale_modules(model)]
    assert len(names) == 8
    assert any(n.startswith("visual.") for n in names) and any(n.startswith("transformer.") for n in names)
    lowbit.swap(model, "fp8-tensorwise", filter_fn=lowbit.ALL, simulate=True)
    image, text = torch.randn(2, 3, 32, 32), torch.randint(0, 64, (2, 8))
    image_features, text_features, _ = model(image, text)
    (image_features @ text_features.T).sum().backward()
    grads = [m.gamma.grad for _, m in lowbit.layer_scale.layer_scale_modules(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_helpers_reject_models_without_blocks():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="add_layer_scale"):
        lowbit.zero_init_layer_scale(mlp)
    with pytest.raises(ValueError, match="found no open_clip"):
        lowbit.add_layer_scale(mlp)
    with pytest.raises(ValueError, match="blocks="):
        lowbit.FeatureProbe(mlp)


def block_outputs(model, blocks):
    """Max |output| of each block, captured by the test's own hooks."""
    seen = {}
    handles = [
        b.register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out.detach().abs().max().item())
        )
        for name, b in blocks.items()
    ]
    return seen, handles


def test_feature_probe_timm():
    model = small_timm_vit(init_values=1e-5)
    blocks = {f"blocks.{i}": b for i, b in enumerate(model.blocks)}
    seen, handles = block_outputs(model, blocks)
    x1, x2 = torch.randn(2, 3, 32, 32), 3 * torch.randn(2, 3, 32, 32)
    with lowbit.FeatureProbe(model) as probe:
        assert probe.names == ["blocks.0", "blocks.1"] and probe.max_abs == {}
        model(x1)
        first = dict(seen)
        assert probe.max_abs == pytest.approx(first, rel=1e-6)
        model(x2)
        assert probe.max_abs == pytest.approx({k: max(first[k], seen[k]) for k in first}, rel=1e-6)
        assert probe.max() == pytest.approx(max(probe.max_abs.values()))
        probe.reset()
        assert probe.max_abs == {}
        model(x1)
        assert probe.max_abs == pytest.approx(first, rel=1e-6)
    model(x2)  # hooks removed on exit: nothing recorded
    assert probe.max_abs == pytest.approx(first, rel=1e-6)
    for h in handles:
        h.remove()


def test_feature_probe_open_clip_and_explicit_blocks():
    model = small_open_clip_clip(ls_init_value=1e-5)
    probe = lowbit.FeatureProbe(model)
    expected = [f"{tower}resblocks.{i}" for tower in ("visual.transformer.", "transformer.") for i in range(2)]
    assert sorted(probe.names) == sorted(expected)
    model(torch.randn(2, 3, 32, 32), torch.randint(0, 64, (2, 8)))
    assert set(probe.max_abs) == set(expected) and all(v > 0 for v in probe.max_abs.values())
    probe.remove()

    chosen = [model.visual.transformer.resblocks[1]]
    probe = lowbit.FeatureProbe(model, blocks=chosen)
    assert probe.names == ["visual.transformer.resblocks.1"]
    model.encode_image(torch.randn(2, 3, 32, 32))
    assert list(probe.max_abs) == ["visual.transformer.resblocks.1"]
    probe.remove()
    probe = lowbit.FeatureProbe(model, blocks={"last": model.transformer.resblocks[-1]})
    model.encode_text(torch.randint(0, 64, (2, 8)))
    assert list(probe.max_abs) == ["last"]
    probe.remove()


def test_feature_probe_reports_nan():
    model = small_timm_vit()
    with lowbit.FeatureProbe(model) as probe:
        with torch.no_grad():
            model.blocks[0].mlp.fc2.bias[0] = float("nan")
        model(torch.randn(1, 3, 32, 32))
        assert probe.max() != probe.max()
