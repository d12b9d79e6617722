"""open_clip's output projections held as raw Parameters and applied as `x @ self.proj`:
VisionTransformer.proj, TextTransformer.text_projection (when not an nn.Linear),
MultimodalTransformer.text_projection (CoCa's vocabulary projection) and CLIP.text_projection
(the built-in text tower of RN50, ViT-B-32 ...).

Each applies the projection as the last step of its forward (CLIP: of encode_text, before the
optional normalize), guarded by `is not None`. The adapted method hides the Parameter behind an
instance attribute of None for the call (the Parameter stays registered: parameters(), state_dict
and hooks see it throughout), runs the original method, and applies the projection through a
lowbit layer: x @ P == F.linear(x, P.T).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from lowbit.adapters.base import Adapted, adapt, engine_linear, make_engine

# class key -> name of the projection Parameter
ATTRIBUTES = {
    "open_clip.transformer:VisionTransformer": "proj",
    "open_clip.transformer:TextTransformer": "text_projection",
    "open_clip.transformer:MultimodalTransformer": "text_projection",
    "open_clip.model:CLIP": "text_projection",
}
TARGETS = tuple(ATTRIBUTES)


def _unprojected(module: nn.Module, method, *args, **kwargs):
    """`method`'s result with the projection hidden, and the projection Parameter."""
    name = module.__dict__["_lowbit_projection"]
    proj = getattr(module, name)
    module.__dict__[name] = None  # shadows the registered Parameter for this call only
    try:
        return method(*args, **kwargs), proj
    finally:
        del module.__dict__[name]


class _ClipTextProjectionLowbit(Adapted):
    def encode_text(self, text, normalize: bool = False):
        x, proj = _unprojected(self, super().encode_text, text, normalize=False)
        x = engine_linear(self, x, proj.t(), None)
        return F.normalize(x, dim=-1) if normalize else x


class _ProjectionLowbit(Adapted):
    def forward(self, *args, **kwargs):
        out, proj = _unprojected(self, super().forward, *args, **kwargs)
        if isinstance(out, tuple):  # (pooled, tokens): only the pooled features are projected
            return (engine_linear(self, out[0], proj.t(), None), *out[1:])
        return engine_linear(self, out, proj.t(), None)


def _attribute(module: nn.Module) -> str:
    from lowbit.adapters.base import class_key

    return ATTRIBUTES[class_key(type(module))]


def applies(module: nn.Module) -> bool:
    proj = module._parameters.get(_attribute(module))
    return isinstance(proj, nn.Parameter) and proj.dim() == 2


def default_keep(module: nn.Module, min_features: int) -> bool:
    return min(getattr(module, _attribute(module)).shape) >= min_features


def convert(module: nn.Module, cls, kwargs) -> nn.Module:
    name = _attribute(module)
    in_features, out_features = getattr(module, name).shape
    engine = make_engine(cls, kwargs, in_features, out_features, getattr(module, name).dtype)
    adapt(module, _ClipTextProjectionLowbit if name == "text_projection" and hasattr(module, "encode_text")
          else _ProjectionLowbit, engine)
    object.__setattr__(module, "_lowbit_projection", name)
    return module
