"""The common base of lowbit's linear layers: an nn.Linear whose matmuls a subclass chooses."""

from __future__ import annotations

import copy

import torch
from torch import nn


def stash_without_parameters(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` (same class and attributes, submodules copied the same way) whose
    Parameter slots are empty, kept so that `to_original` can rebuild the exact original class.

    The copy holds no Parameters on purpose: FSDP2's `fully_shard` (or any code that replaces a
    Parameter) frees the full weight only when nothing else refers to it. The caller's module is
    left untouched.
    """
    stash = copy.copy(module)
    stash._parameters = dict.fromkeys(module._parameters)
    stash._buffers = dict(module._buffers)
    stash._modules = {name: stash_without_parameters(child) for name, child in module._modules.items()}
    return stash


def refuse_torchscript(module: nn.Module):
    raise TypeError(
        f"torch.jit.script: {type(module).__name__} runs a custom autograd Function (and Triton kernels on "
        "CUDA), which TorchScript cannot compile. Use torch.compile or torch.export for a swapped model, "
        "or lowbit.unswap(model) before scripting."
    )


class LowbitLinear(nn.Linear):
    """An nn.Linear (isinstance checks, init and state_dict behave as for nn.Linear) whose forward
    runs `self.linear(input, self.weight, self.bias)`.

    Subclasses implement `linear`, which also serves weights the layer does not own, such as
    nn.MultiheadAttention's `in_proj_weight` (see `LowbitMultiheadAttention`).
    """

    def linear(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement linear(input, weight, bias)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.linear(input, self.weight, self.bias)

    # torch.jit.script calls this on every module it is about to compile.
    __prepare_scriptable__ = refuse_torchscript

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> LowbitLinear:
        """A layer of this class that shares `linear`'s Parameters (no copy) and training mode.

        A copy of `linear` without its Parameters is kept (not as a submodule, so state_dict keys
        stay the same) for `to_original`.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear expects an nn.Linear, got {type(linear).__name__}")
        # Built on the meta device: no memory is allocated for weights that are replaced at once.
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            device="meta", dtype=linear.weight.dtype, **kwargs,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        object.__setattr__(layer, "_lowbit_original", stash_without_parameters(linear))
        return layer

    def to_original(self) -> nn.Linear:
        """A layer of the class this one was built from (or a plain nn.Linear), holding this layer's
        Parameters."""
        original = self.__dict__.get("_lowbit_original")
        if original is None:
            original = nn.Linear(
                self.in_features, self.out_features, self.bias is not None,
                device="meta", dtype=self.weight.dtype,
            )
        original.weight = self.weight
        original.bias = self.bias
        original.train(self.training)
        return original
