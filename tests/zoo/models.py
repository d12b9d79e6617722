"""Tiny, randomly initialised versions of the zoo models the coverage tests swap (no downloads).

Each builder keeps the model family's layer classes (the ones the adapters convert) and shrinks
widths, depths and image sizes so a forward and backward take well under a second on a CPU.
"""

from __future__ import annotations

import copy

import torch


def _timm(name, **kwargs):
    import timm

    return timm.create_model(name, pretrained=False, num_classes=8, **kwargs)


def _open_clip(name, cls_name, **shrink):
    import open_clip

    cfg = copy.deepcopy(open_clip.get_model_config(name))
    for tower, changes in shrink.items():
        if tower == "embed_dim":
            cfg["embed_dim"] = changes
        else:
            cfg[tower].update(changes)
    cfg.pop("custom_text", None)
    return getattr(open_clip, cls_name)(**cfg)


def _coca(**shrink):
    model = _open_clip("coca_ViT-B-32", "CoCa", **shrink)
    # open_clip creates MultimodalTransformer.text_projection with torch.empty and never initializes
    # it (values up to 1e36 here): give it the init its TextTransformer twin gets.
    proj = model.text_decoder.text_projection
    torch.nn.init.normal_(proj.data, std=proj.shape[0] ** -0.5)
    return model


def _images(size):
    return lambda: (torch.randn(2, 3, size, size),)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


_TEXT = {"context_length": 12, "vocab_size": 64, "width": 64, "heads": 2, "layers": 1}

# name -> (builder, example inputs)
ZOO = {
    "beit_base_patch16_224": (
        lambda: _timm("beit_base_patch16_224", img_size=32, embed_dim=64, depth=2, num_heads=2), _images(32)),
    "eva02_tiny_patch14_224": (lambda: _timm("eva02_tiny_patch14_224", img_size=28, depth=2), _images(28)),
    "swinv2_tiny_window8_256": (
        lambda: _timm("swinv2_tiny_window8_256", img_size=64, embed_dim=32, depths=(1, 1, 1, 1),
                      num_heads=(1, 2, 2, 4), window_size=2),
        _images(64)),
    "convnext_atto": (lambda: _timm("convnext_atto"), _images(32)),
    "RN50": (
        lambda: _open_clip("RN50", "CLIP", embed_dim=64, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1],
                                                                     "width": 16}, text_cfg=_TEXT),
        lambda: (torch.randn(2, 3, 32, 32), torch.randint(0, 64, (2, 12)))),
    "coca_ViT-B-32": (
        lambda: _coca(embed_dim=64,
                      vision_cfg={"image_size": 64, "layers": 1, "width": 96, "attn_pooler_heads": 2,
                                  "head_width": 32},
                      text_cfg={**_TEXT, "context_length": 11},
                      multimodal_cfg={**_TEXT, "context_length": 11, "attn_pooler_heads": 2}),
        lambda: (torch.randn(2, 3, 64, 64), torch.randint(0, 64, (2, 11)))),
    "GPT2LMHeadModel": (_gpt2, lambda: (torch.randint(0, 128, (2, 16)),)),
}


def outputs(out) -> list[torch.Tensor]:
    """The floating tensors of a model's output (dicts, tuples and ModelOutputs flattened)."""
    from torch.utils._pytree import tree_flatten

    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
