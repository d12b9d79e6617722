"""nn.MultiheadAttention whose projections run through a lowbit linear, and the nn.Transformer layers
around it without torch's fused fast path.

nn.MultiheadAttention holds its q/k/v projections as raw Parameters (`in_proj_weight`, or
`q/k/v_proj_weight` when kdim/vdim differ) and calls F.linear on them, and on `out_proj.weight`,
inside F.multi_head_attention_forward. `LowbitMultiheadAttention` is an nn.MultiheadAttention (same
attributes, same Parameters, inherited methods) whose forward is torch's own, except that the call
to F.multi_head_attention_forward goes to `lowbit.nn.mha_forward`, the same computation with the
projections through `out_proj.linear`: masks, dropout, kdim/vdim, bias_k/bias_v, add_zero_attn and
is_causal behave as torch's.

Torch's fused fast paths (`torch._native_multi_head_attention` in eval, the fused encoder layer,
nested tensors in nn.TransformerEncoder) read the weights directly and would run a swapped layer in
16-bit without a word. They all stand aside when a torch-function mode is active, which is what
`_RouteProjections` is.

"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lowbit.nn.base import LowbitLinear, refuse_torchscript, stash_without_parameters
from lowbit.nn.mha_forward import multi_head_attention_forward

__all__ = [
    "LowbitMultiheadAttention",
    "LowbitTransformerEncoderLayer",
    "LowbitTransformerDecoderLayer",
    "LowbitTransformerEncoder",
    "LowbitTransformerDecoder",
    "LowbitTransformer",
    "no_fast_path_class",
    "with_fast_path",
    "without_fast_path",
]


class _RouteProjections(TorchFunctionMode):
    """While active, torch's fast paths are off and, given `linear`, F.multi_head_attention_forward
    runs as `lowbit.nn.mha_forward` with its projections through `linear`.

    Every other call runs unchanged (a mode's handler runs with the mode itself switched off).
    """

    def __init__(self, linear=None) -> None:
        super().__init__()
        self.linear = linear

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward and self.linear is not None:
            return multi_head_attention_forward(*args, **kwargs, linear=self.linear)
        return func(*args, **kwargs)


class LowbitMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention (isinstance, attributes and state_dict as the original) with its q/k/v
    and output projections in low precision through `out_proj.linear`.

    Build it with `from_mha`; it shares the original module's Parameters.
    """

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, linear_cls: type[LowbitLinear], **kwargs):
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"{cls.__name__}.from_mha expects an nn.MultiheadAttention, got {type(mha).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        # Same attributes and Parameters (dicts copied, so the original module is left as it was).
        layer.__dict__.update({k: v for k, v in mha.__dict__.items() if not k.startswith("_lowbit")})
        layer._parameters = dict(mha._parameters)
        layer._buffers = dict(mha._buffers)
        layer._modules = dict(mha._modules)
        layer.out_proj = linear_cls.from_linear(mha.out_proj, **kwargs)
        object.__setattr__(layer, "_lowbit_original", stash_without_parameters(mha))
        return layer

    def to_original(self) -> nn.MultiheadAttention:
        """An nn.MultiheadAttention of the class this was built from, holding this module's Parameters."""
        mha = self.__dict__["_lowbit_original"]
        for name in mha._parameters:
            setattr(mha, name, getattr(self, name))
        for name, module in self._modules.items():
            if name != "out_proj":
                setattr(mha, name, module)
        mha.out_proj = self.out_proj.to_original()
        mha.train(self.training)
        return mha

    __prepare_scriptable__ = refuse_torchscript

    def forward(self, query, key, value, *args, **kwargs):
        # nn.MultiheadAttention.forward (batch_first, argument checks) with its call to
        # F.multi_head_attention_forward served by ours.
        with _RouteProjections(self.out_proj.linear):
            return super().forward(query, key, value, *args, **kwargs)


class _NoFastPath:
    """Runs the torch module's forward with a torch-function mode active, so that torch skips its
    fused paths (which read swapped layers' weights directly); layers then run as modules."""

    def forward(self, *args, **kwargs):
        with _RouteProjections():
            return super().forward(*args, **kwargs)


class LowbitTransformerEncoderLayer(_NoFastPath, nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer holding swapped layers, always on the regular (unfused) path."""


class LowbitTransformerDecoderLayer(_NoFastPath, nn.TransformerDecoderLayer):
    """nn.TransformerDecoderLayer holding swapped layers, always on the regular path."""


class LowbitTransformerEncoder(_NoFastPath, nn.TransformerEncoder):
    """nn.TransformerEncoder holding swapped layers: no nested-tensor fast path."""


class LowbitTransformerDecoder(_NoFastPath, nn.TransformerDecoder):
    """nn.TransformerDecoder holding swapped layers, always on the regular path."""


class LowbitTransformer(_NoFastPath, nn.Transformer):
    """nn.Transformer holding swapped layers, always on the regular path."""


_NO_FAST_PATH = {
    nn.TransformerEncoderLayer: LowbitTransformerEncoderLayer,
    nn.TransformerDecoderLayer: LowbitTransformerDecoderLayer,
    nn.TransformerEncoder: LowbitTransformerEncoder,
    nn.TransformerDecoder: LowbitTransformerDecoder,
    nn.Transformer: LowbitTransformer,
}


def no_fast_path_class(module: nn.Module) -> type[nn.Module] | None:
    """The lowbit class for a torch Transformer module of exactly this class, else None."""
    return _NO_FAST_PATH.get(type(module))


def without_fast_path(module: nn.Module) -> nn.Module:
    """`module` (an nn.Transformer* of exactly that class) as its `_NoFastPath` class, same state."""
    cls = _NO_FAST_PATH[type(module)]
    converted = cls.__new__(cls)
    converted.__dict__.update(module.__dict__)
    for slot in ("_parameters", "_buffers", "_modules"):
        converted.__dict__[slot] = dict(module.__dict__[slot])
    object.__setattr__(converted, "_lowbit_original", stash_without_parameters(module))
    return converted


def with_fast_path(module: nn.Module) -> nn.Module:
    """Undo `without_fast_path`: the original class with this module's current children and state."""
    original = module.__dict__["_lowbit_original"]
    restored = type(original).__new__(type(original))
    restored.__dict__.update({k: v for k, v in module.__dict__.items() if k != "_lowbit_original"})
    return restored
