"""timm attention with a fused qkv Linear and separate q/v biases (beit, eva, swinv2).

These read `F.linear(x, self.qkv.weight, torch.cat((q_bias, k_bias, v_bias)))`, so a swapped `qkv`
never runs. timm's own forward has a branch that calls `self.qkv(x)` and then adds the bias
(`qkv_bias_separate`); the adapter turns that branch on for the instance, so the swapped `qkv` runs
and timm's code stays timm's. The bias add costs one extra elementwise pass over qkv's output.
"""

from __future__ import annotations

from torch import nn

from lowbit.adapters.base import Adapted, adapt

TARGETS = (
    "timm.models.beit:Attention",
    "timm.models.eva:EvaAttention",
    "timm.models.swin_transformer_v2:WindowAttention",
)


class _QkvThroughModule(Adapted):
    def to_original(self) -> nn.Module:
        self.qkv_bias_separate = self.__dict__["_lowbit_qkv_bias_separate"]
        return super().to_original()


def applies(module: nn.Module) -> bool:
    """Only the layout that bypasses `self.qkv`: a fused qkv Linear, q/v biases and the F.linear branch."""
    return (
        isinstance(getattr(module, "qkv", None), nn.Linear)
        and getattr(module, "q_bias", None) is not None
        and getattr(module, "qkv_bias_separate", None) is False
    )


def default_keep(module: nn.Module, min_features: int) -> bool:
    return True  # only re-routes the forward; whether `qkv` itself is swapped is its own filter call


def convert(module: nn.Module, cls, kwargs) -> nn.Module:
    saved = module.qkv_bias_separate
    adapt(module, _QkvThroughModule)
    object.__setattr__(module, "_lowbit_qkv_bias_separate", saved)
    module.qkv_bias_separate = True
    return module
