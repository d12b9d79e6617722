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


# Bound on the elements one foreach call works on: its temporaries (g^2 / u, fp32) then cost at most
# 2 x 4 x 2^26 bytes = 512 MiB, however large the model.
_FOREACH_MAX_NUMEL = 2**26


class RMSSignal:
    """Computes RMS_t for every parameter the optimizer holds, named by the model's qualified names.

    Two paths compute the same ops: `foreach=True` groups the parameters into a few
    `torch._foreach_*` calls, a constant number of kernel launches per step (what a GPU wants);
    `foreach=False` runs one tensor at a time, which keeps each tensor's temporaries in cache (what
    a CPU wants: measured 1.5x faster there) and needs less temporary memory. None picks foreach
    when every parameter is on CUDA, as torch's optimizers do. Both use the identity

        g^2 / max(u / bc, eps^2) = bc * g^2 / max(u, bc * eps^2),    bc = 1 - beta2^t,

    so the bias correction is a per-tensor scalar applied to the reduced value, and the mean's
    1 / numel is a host-side scalar too: nothing is copied between host and device.

    Args:
        model: the module whose `named_parameters()` name the layers.
        optimizer: an Adam-family optimizer: param groups with `betas` and `eps`, per-parameter
            state with `exp_avg_sq` and `step`.
        foreach: True / False for the grouped / per-tensor path; None: foreach on CUDA.

    Raises:
        ValueError: if a param group has no `betas` (not an Adam-family optimizer).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, foreach: bool | None = None) -> None:
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
        if foreach is None:
            foreach = bool(self.params) and all(p.device.type == "cuda" for p in self.params)
        self.foreach = foreach
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
        values: list[torch.Tensor | None] = [None] * len(self.params)
        # (index, g, u, bc, eps) of the parameters whose RMS is computed below.
        todo: list[tuple[int, torch.Tensor, torch.Tensor, float, float]] = []
        for i, (p, group) in enumerate(zip(self.params, self._groups)):
            g = p.grad
            state = self.optimizer.state.get(p)
            if g is None or g.is_sparse or not state:
                continue
            if "exp_avg_sq" not in state:
                raise ValueError(
                    f"SpikeMonitor: {type(self.optimizer).__name__} keeps no 'exp_avg_sq' (AdamW's second "
                    f"moment u) for {self.names[i]!r}, so RMS(g^2/u) cannot be computed"
                )
            if g.numel() == 0:
                values[i] = torch.zeros((), device=device)  # an empty mean: 0, as StableAdamW takes it
                continue
            if "rms" in state:
                # StableAdamW already computed exactly this quantity (from the same g_t and u_t).
                values[i] = state["rms"].detach().float().reshape(()).to(device)
                continue
            beta2, eps = group["betas"][1], group["eps"]
            u = state["exp_avg_sq"]
            step = state["step"]
            if not self.unbiased and isinstance(step, torch.Tensor) and step.device.type != "cpu":
                # capturable / fused optimizers keep the step on the device: stay there (no sync).
                u_hat = u.float() / (1.0 - beta2 ** step.float())
                values[i] = (g.float().square() / u_hat.clamp_min(eps * eps)).mean().sqrt().to(device)
                continue
            bc = 1.0 if self.unbiased else 1.0 - beta2 ** float(step)
            todo.append((i, g, u, bc, eps))
        if self.foreach:
            self._foreach(todo, values, device)
        else:
            for i, g, u, bc, eps in todo:
                # mean(g^2 / max(u / bc, eps^2)) = bc * mean(g^2 / max(u, bc * eps^2))
                ratio = g.float().square().div_(u.float().clamp_min(bc * eps * eps))
                values[i] = ratio.mean().mul_(bc).sqrt_().to(device)
        present = [v is not None for v in values]
        if not values:
            return torch.empty(0, device=device), present
        return torch.stack([v if v is not None else self._nan_on(device) for v in values]), present

    def _foreach(self, todo: list, values: list, device: torch.device) -> None:
        """The same math as the per-tensor path, in chunks of at most _FOREACH_MAX_NUMEL elements."""
        chunk: list = []
        numel = 0
        for item in [*todo, None]:
            if item is not None and (not chunk or numel + item[1].numel() <= _FOREACH_MAX_NUMEL):
                chunk.append(item)
                numel += item[1].numel()
                continue
            if chunk:
                gs = [g.float() for _, g, _, _, _ in chunk]
                us = [u.float() for _, _, u, _, _ in chunk]
                # ratio = g^2 / max(u, bc eps^2)
                ratio = torch._foreach_mul(gs, gs)
                torch._foreach_div_(ratio, torch._foreach_clamp_min(us, [bc * eps * eps for _, _, _, bc, eps in chunk]))
                # RMS = sqrt(bc * sum(ratio) / numel); the ratio is >= 0, so its sum is its L1 norm
                sums = torch._foreach_norm(ratio, 1)
                del ratio
                torch._foreach_mul_(sums, [bc / max(g.numel(), 1) for _, g, _, bc, _ in chunk])
                torch._foreach_sqrt_(sums)
                for (i, *_), v in zip(chunk, sums):
                    values[i] = v.to(device)
            chunk, numel = ([item], item[1].numel()) if item is not None else ([], 0)
