"""The per-layer RMS signal of Wortsman, Dettmers et al. (2023), section 3.4.

For every parameter tensor, after `optimizer.step()` has folded the current gradient g_t into the
second moment:

    u_hat_t = exp_avg_sq / (1 - beta2^t)                 # bias-corrected; includes g_t^2
    RMS_t   = sqrt(mean(g_t^2 / max(u_hat_t, eps^2)))

RMS_t >> 1 means the layer's squared gradients have outrun AdamW's slowly moving estimate u, so the
update is far larger than the learning rate intends; the paper finds loss spikes 1-8 steps later.

StableAdamW folds bias correction into its betas, so its u is already unbiased and it keeps the
value it computed as `state["rms"]`; that value is reused rather than recomputed.

Everything is computed as device tensors and stacked into one vector, so the caller pays one
host transfer per step, never one per parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _unbiased_second_moment(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` keeps an already unbiased u (StableAdamW's folded bias correction)."""
    # A class attribute lets any optimizer opt in; the name check covers StableAdamW without
    # importing lowbit.optim (monitor and optim stand side by side, neither imports the other).
    if getattr(optimizer, "second_moment_is_unbiased", False):
        return True
    return any(cls.__name__ == "StableAdamW" for cls in type(optimizer).__mro__)


class RMSSignal:
    """Computes RMS_t for every parameter the optimizer holds, named by the model's qualified names.

    Args:
        model: the module whose `named_parameters()` name the layers.
        optimizer: an Adam-family optimizer: param groups with `betas` and `eps`, per-parameter
            state with `exp_avg_sq` and `step`.

    Raises:
        ValueError: if a param group has no `betas` (not an Adam-family optimizer).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        self.optimizer = optimizer
        self.unbiased = _unbiased_second_moment(optimizer)
        self.params: list[nn.Parameter] = []
        self.names: list[str] = []
        self._groups: list[dict] = []
        seen: set[int] = set()
        for gi, group in enumerate(optimizer.param_groups):
            if "betas" not in group or "eps" not in group:
                raise ValueError(
                    "SpikeMonitor needs an Adam-family optimizer (param groups with 'betas' and 'eps', "
                    f"state with 'exp_avg_sq'); got {type(optimizer).__name__}"
                )
            for pi, p in enumerate(group["params"]):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                self.params.append(p)
                # A parameter the optimizer holds but the model does not gets a positional name.
                self.names.append(names.get(id(p), f"param_groups.{gi}.params.{pi}"))
                self._groups.append(group)
        self._nan: dict[torch.device, torch.Tensor] = {}

    def _nan_on(self, device: torch.device) -> torch.Tensor:
        # Cached so a missing layer costs no allocation (and no host-to-device copy) per step.
        if device not in self._nan:
            self._nan[device] = torch.full((), math.nan, dtype=torch.float32, device=device)
        return self._nan[device]

    @torch.no_grad()
    def compute(self) -> tuple[torch.Tensor, list[bool]]:
        """RMS_t of every tracked parameter, as one fp32 vector on the first parameter's device.

        Returns:
            (rms, present): `rms[i]` is NaN where `present[i]` is False, i.e. the parameter has no
            gradient (or a sparse one) or no optimizer state yet this step. `present` is decided on
            the host from Python-side facts only, so computing it never syncs with the device.
        """
        device = self.params[0].device if self.params else torch.device("cpu")
        values: list[torch.Tensor] = []
        present: list[bool] = []
        for p, group in zip(self.params, self._groups):
            g = p.grad
            state = self.optimizer.state.get(p)
            if g is None or g.is_sparse or not state or "exp_avg_sq" not in state:
                values.append(self._nan_on(device))
                present.append(False)
                continue
            if "rms" in state:
                # StableAdamW already computed exactly this quantity (from the same g_t and u_t).
                values.append(state["rms"].detach().float().reshape(()).to(device))
                present.append(True)
                continue
            beta2 = group["betas"][1]
            eps = group["eps"]
            u = state["exp_avg_sq"].float()
            if not self.unbiased:
                step = state["step"]
                if isinstance(step, torch.Tensor) and step.device.type != "cpu":
                    # capturable / fused optimizers keep the step on the device: stay there (no sync).
                    u = u / (1.0 - beta2 ** step.float())
                else:
                    u = u / (1.0 - beta2 ** float(step))
            ratio = g.float().square() / u.clamp_min(eps * eps)
            values.append(ratio.mean().sqrt().to(device))
            present.append(True)
        if not values:
            return torch.empty(0, device=device), present
        return torch.stack(values), present
