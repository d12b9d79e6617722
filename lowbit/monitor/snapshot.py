"""Undoing optimizer steps: the state the "skip" and "rollback" actions restore.

- `StepUndo` ("skip"): an optimizer step pre-hook copies every parameter and its optimizer state
  into buffers allocated once, so the step the monitor judges after the fact can be undone exactly.
  Cost: one more copy of parameters + optimizer state in memory (on their own device) and one
  device-to-device copy of them per step; no host sync.
- `Checkpoint` ("rollback"): a full copy of model.state_dict() and optimizer.state_dict() taken every
  N good steps, on the CPU by default (one device-to-host transfer per snapshot, not per step).

Both restore in place (`copy_` into existing tensors where shapes allow), and neither touches the
param groups' hyperparameters: a learning-rate schedule keeps its own clock across a restore.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class StepUndo:
    """Snapshots parameters and optimizer state right before each `optimizer.step()`.

    Args:
        optimizer: the optimizer whose steps may be undone.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self._param_bufs: list[torch.Tensor | None] = [None] * len(self.params)
        # param index -> {state key: tensor buffer or plain value}; absent: no state before the step.
        self._state: dict[int, dict[str, Any]] = {}
        self._state_bufs: dict[tuple[int, str], torch.Tensor] = {}
        self.fresh = False  # True between a pre-step snapshot and the monitor's consuming it
        self._handle = optimizer.register_step_pre_hook(self._capture)

    @torch.no_grad()
    def _capture(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for i, p in enumerate(self.params):
            buf = self._param_bufs[i]
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = self._param_bufs[i] = torch.empty_like(p, memory_format=torch.preserve_format)
            buf.copy_(p)
        self._state = {}
        for i, p in enumerate(self.params):
            state = optimizer.state.get(p)
            if not state:
                continue
            saved: dict[str, Any] = {}
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    buf = self._state_bufs.get((i, key))
                    if (
                        buf is None
                        or buf.shape != value.shape
                        or buf.dtype != value.dtype
                        or buf.device != value.device
                    ):
                        buf = self._state_bufs[(i, key)] = torch.empty_like(value)
                    buf.copy_(value)
                    saved[key] = buf
                else:
                    saved[key] = value
            self._state[i] = saved
        self.fresh = True

    @torch.no_grad()
    def restore(self) -> None:
        """Puts parameters and optimizer state back to what they were before the last step."""
        for p, buf in zip(self.params, self._param_bufs):
            if buf is not None:
                p.copy_(buf)
        for i, p in enumerate(self.params):
            saved = self._state.get(i)
            if saved is None:
                # The undone step created this state (the first step): drop it.
                self.optimizer.state.pop(p, None)
                continue
            state = self.optimizer.state[p]
            for key in [k for k in state if k not in saved]:
                del state[key]
            for key, value in saved.items():
                current = state.get(key)
                if isinstance(value, torch.Tensor):
                    if (
                        isinstance(current, torch.Tensor)
                        and current.shape == value.shape
                        and current.dtype == value.dtype
                        and current.device == value.device
                    ):
                        current.copy_(value)
                    else:
                        state[key] = value.clone()
                else:
                    state[key] = value
        self.fresh = False

    def remove(self) -> None:
        self._handle.remove()


def _clone_tree(obj: Any, device: torch.device | str | None) -> Any:
    """Deep copy of nested dicts / lists whose tensors are detached and cloned (onto `device`)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to(device, copy=True) if device is not None else t.clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v, device) for v in obj)
    return obj


class Checkpoint:
    """The last good model + optimizer state, kept in memory for "rollback".

    Args:
        model: the model whose state_dict is kept.
        optimizer: the optimizer whose state_dict is kept.
        device: where the copy lives: "cpu" (default; saves device memory) or None for each
            tensor's own device (no host transfer, costs device memory).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device | str | None = "cpu"
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.step: int | None = None
        self._model_state: dict | None = None
        self._optim_state: dict | None = None

    def save(self, step: int) -> None:
        self._model_state = _clone_tree(self.model.state_dict(), self.device)
        self._optim_state = _clone_tree(self.optimizer.state_dict(), self.device)
        self.step = step

    def restore(self) -> int:
        """Loads the kept state back into the model and optimizer; returns the step it was taken at.

        Raises:
            RuntimeError: if nothing has been saved.
        """
        if self._model_state is None or self._optim_state is None or self.step is None:
            raise RuntimeError("no checkpoint to roll back to")
        # Module.load_state_dict copies into the existing parameters, so the snapshot stays intact.
        self.model.load_state_dict(self._model_state)
        # Optimizer.load_state_dict may keep the given tensors (when device and dtype already match),
        # so hand it a clone or the next step would write into the snapshot; keep today's
        # hyperparameters (lr from a schedule) rather than the snapshot's.
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(_clone_tree(self._optim_state, None))
        for group, h in zip(self.optimizer.param_groups, hyper):
            group.update(h)
        return self.step
