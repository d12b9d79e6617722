"""swap / unswap on open_clip and timm ViTs: what is replaced, what is kept, and the features."""

import copy
import io
import logging

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import LowbitMultiheadAttention, SwitchBackLinear
from lowbit.swap import default_filter

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min().item()


def expected_counts(model, keep):
    """(linears, attentions) the swap should replace, counted on the float model."""
    mha = [m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) and keep(m, n)]
    inside_mha = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    linears = [
        m for n, m in model.named_modules()
        if type(m) is nn.Linear and id(m) not in inside_mha and keep(m, n)
    ]
    return len(linears) + len(mha), len(mha)  # each attention brings its out_proj


def counts(model):
    return (
        sum(isinstance(m, SwitchBackLinear) for m in model.modules()),
        sum(isinstance(m, LowbitMultiheadAttention) for m in model.modules()),
    )


def state_dict_bytes(model):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture(scope="module")
def clip_pair():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    return model, copy.deepcopy(model)


def test_open_clip_vit_b32_both_towers(clip_pair):
    reference, model = clip_pair
    want = expected_counts(model, default_filter)
    assert want == (72, 24)  # 12 blocks x (c_fc, c_proj, out_proj) in each tower; 12 + 12 attentions
    keys = list(model.state_dict())
    params = {n: (p, p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()}

    lowbit.swap(model, "switchback")
    assert counts(model) == want
    assert list(model.state_dict()) == keys
    for name, p in model.named_parameters():  # shared, not copied
        original, dtype, device, requires_grad = params[name]
        assert p is original and (p.dtype, p.device, p.requires_grad) == (dtype, device, requires_grad)

    image = torch.randn(2, 3, 224, 224)
    text = torch.randint(1, 49000, (2, 77))
    with torch.no_grad():
        ref_img, ref_txt = reference.encode_image(image), reference.encode_text(text)
        img, txt = model.encode_image(image), model.encode_text(text)
    assert cosine(ref_img, img) >= 0.99 and cosine(ref_txt, txt) >= 0.99

    # A training step reaches every swapped weight, the attention input projection included.
    model.train()
    (model.encode_image(image).square().mean() + model.encode_text(text).square().mean()).backward()
    for block in model.visual.transformer.resblocks:
        assert block.attn.in_proj_weight.grad is not None and block.mlp.c_fc.weight.grad is not None
    model.zero_grad()
    model.eval()

    lowbit.unswap(model)
    assert counts(model) == (0, 0)
    attn = model.visual.transformer.resblocks[0].attn
    assert type(attn) is nn.MultiheadAttention
    assert type(attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), ref_img)


def test_checkpoints_load_both_ways(clip_pair):
    reference, _ = clip_pair
    float_model = copy.deepcopy(reference)
    swapped = lowbit.swap(copy.deepcopy(reference), "switchback-row")
    with torch.no_grad():
        for p in swapped.parameters():
            p.add_(0.01)
    float_model.load_state_dict(state_dict_bytes(swapped))  # int8 checkpoint -> float model
    for (n, a), b in zip(float_model.state_dict().items(), swapped.state_dict().values()):
        assert torch.equal(a, b), n
    fresh = lowbit.swap(copy.deepcopy(reference), "switchback")
    fresh.load_state_dict(state_dict_bytes(float_model))  # float checkpoint -> int8 model
    for a, b in zip(fresh.state_dict().values(), float_model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["switchback", "switchback-row", "switchback-memeff"])
def test_timm_vit_default_filter(name):
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=64, num_classes=10).eval()
    reference = copy.deepcopy(model)
    keep = default_filter
    want = expected_counts(model, keep)
    keys = list(model.state_dict())
    lowbit.swap(model, name)
    # timm runs attention through its own qkv/proj nn.Linear layers: 4 per block, and the head
    # (768 -> 10) is skipped by the default filter for being narrow.
    assert counts(model) == want == (48, 0)
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert cosine(reference.forward_features(x), model.forward_features(x)) >= 0.99
    lowbit.unswap(model)
    assert counts(model) == (0, 0)


def test_filter_fn_class_and_kwargs():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5)
    with pytest.warns(UserWarning, match="converted no layer: .* narrower than MIN_FEATURES"):
        assert counts(lowbit.swap(copy.deepcopy(model))) == (0, 0)  # 192 wide: all below MIN_FEATURES
    swapped = lowbit.swap(model, SwitchBackLinear, filter_fn=lambda m, n: "mlp" in n, weight_quant="row")
    layers = [m for m in swapped.modules() if isinstance(m, SwitchBackLinear)]
    assert len(layers) == 24 and all(m.config.weight_quant == "row" for m in layers)
    qkv = swapped.blocks[0].attn.qkv
    assert isinstance(qkv, nn.Linear) and not isinstance(qkv, SwitchBackLinear)
    with pytest.raises(ValueError, match="unknown layer name"):
        lowbit.swap(model, "int4")
    with pytest.raises(TypeError, match="LowbitLinear subclass"):
        lowbit.swap(model, nn.Linear)


def test_root_linear_and_idempotence():
    layer = nn.Linear(16, 8)
    swapped = lowbit.swap(layer, filter_fn=lowbit.ALL)
    assert isinstance(swapped, SwitchBackLinear) and swapped.weight is layer.weight
    again = lowbit.swap(nn.Sequential(swapped), filter_fn=lowbit.ALL)
    assert again[0] is swapped  # already-swapped layers are left alone
    restored = lowbit.unswap(swapped)
    assert type(restored) is nn.Linear and restored.weight is layer.weight and restored.bias is layer.bias
    assert layer.weight is not None  # the caller's module is not emptied by the swap


class TaggedLinear(nn.Linear):
    """A user subclass with an attribute of its own: unswap must give both back."""


@pytest.mark.parametrize("wrap", ["linear", "attention"])
def test_swapped_modules_do_not_keep_replaced_weights_alive(wrap):
    """FSDP2's fully_shard replaces each Parameter with its shard and relies on the full one being
    freed. A swapped module must keep no hidden reference to it (e.g. through the stashed original)."""
    import gc
    import weakref

    if wrap == "linear":
        model = nn.Sequential(TaggedLinear(16, 8))
        model[0].tag = "kept"
    else:
        model = nn.Sequential(nn.MultiheadAttention(16, 2))
    lowbit.swap(model, filter_fn=lowbit.ALL)
    old = {name: weakref.ref(p) for name, p in model.named_parameters()}
    for module in model.modules():  # what fully_shard does, one Parameter at a time
        for name, param in list(module._parameters.items()):
            if param is not None:
                setattr(module, name, nn.Parameter(param.detach().clone()))
    param = None  # the loop variable itself holds the last one
    gc.collect()
    assert all(ref() is None for ref in old.values()), [n for n, ref in old.items() if ref() is not None]

    lowbit.unswap(model)
    if wrap == "linear":
        assert type(model[0]) is TaggedLinear and model[0].tag == "kept"
    else:
        assert type(model[0]) is nn.MultiheadAttention
    new = dict(model.named_parameters())
    assert set(new) == set(old) and all(p.grad is None for p in new.values())


def test_swap_to_another_format_retargets_every_layer():
    model = nn.Sequential(nn.Linear(16, 16), nn.MultiheadAttention(16, 2, batch_first=True))
    lowbit.swap(model, "switchback", filter_fn=lowbit.ALL)
    lowbit.swap(model, "fp8-tensorwise", filter_fn=lowbit.ALL, simulate=True)
    from lowbit.nn import Float8Linear

    assert isinstance(model[0], Float8Linear) and isinstance(model[1].out_proj, Float8Linear)
    assert model[0].config.recipe == "tensorwise"
    lowbit.swap(model, "switchback-row", filter_fn=lowbit.ALL)
    assert isinstance(model[0], SwitchBackLinear) and model[0].config.weight_quant == "row"
    lowbit.unswap(model)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.MultiheadAttention
    assert type(model[1].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_swap_reports_what_it_did(caplog):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 600), nn.Linear(600, 600))
    with caplog.at_level(logging.INFO, logger="lowbit.swap"):
        lowbit.swap(model)
    assert "1 swapped" in caplog.text and "2 narrower than MIN_FEATURES=512" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowbit.swap"):
        lowbit.swap(model, filter_fn=lowbit.ALL)
    assert "2 swapped, 1 already" in caplog.text
    with pytest.warns(UserWarning, match="converted no layer: .*no nn.Linear"):
        lowbit.swap(nn.Sequential(nn.ReLU()))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_is_refused_both_ways():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(TypeError, match="swap the Python module"):
        lowbit.swap(scripted, filter_fn=lowbit.ALL)
    holder = nn.Sequential(scripted, nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"left TorchScript submodules as they are .*: 0;"):
        lowbit.swap(holder, filter_fn=lowbit.ALL)
    assert isinstance(holder[1], SwitchBackLinear)
    with pytest.raises(TypeError, match="TorchScript cannot compile"):
        torch.jit.script(lowbit.swap(nn.Sequential(nn.Linear(8, 8)), filter_fn=lowbit.ALL))
