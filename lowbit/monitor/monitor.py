"""SpikeMonitor: loss spikes, the per-layer RMS spikes that precede them, and what to do about them."""

from __future__ import annotations

import copy
import math
import numbers
import os
from collections import deque
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.monitor.detector import RobustDetector, RobustThreshold
from lowbit.monitor.signal import RMSSignal
from lowbit.monitor.snapshot import Checkpoint, StepUndo
from lowbit.monitor.writers import JSONL_MODES, JsonlWriter, TensorBoardWriter

ACTIONS = ("log", "skip", "rollback")
KINDS = ("loss_spike", "rms_spike", "nonfinite_loss")
STATE_VERSION = 1  # of state_dict()'s layout

# Defaults chosen so a smooth AdamW run raises nothing (tests/monitor/test_detect.py): the loss must
# jump by 6 robust standard deviations and at least 6% (rel_floor 0.01 * k 6); a layer's RMS by 6
# robust standard deviations, to at least 2.2x its median (rel_floor 0.2 * k 6) and above 2 (the
# paper's "RMS >> 1": below that Adam's update is still about lr-sized).
DEFAULT_LOSS = RobustThreshold(window=50, k=6.0, min_history=10, rel_floor=0.01)
DEFAULT_RMS = RobustThreshold(window=50, k=6.0, min_history=10, rel_floor=0.2, floor=2.0)


def _check_loss(loss: object) -> None:
    """A scalar tensor or a real number; checked before the monitor changes any state."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"SpikeMonitor.step needs a scalar loss, got shape {tuple(loss.shape)}")
        if loss.dtype.is_complex or not (loss.dtype.is_floating_point or loss.dtype in _INT_DTYPES):
            raise TypeError(f"SpikeMonitor.step needs a real loss, got a {loss.dtype} tensor")
    elif not isinstance(loss, numbers.Real):
        raise TypeError(f"SpikeMonitor.step needs a loss tensor or a real number, got {type(loss).__name__}")


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _param_layout(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    """The number of parameters in each param group: add_param_group changes it."""
    return tuple(len(group["params"]) for group in optimizer.param_groups)


class SpikeMonitor:
    """Watches a training run for loss spikes and the per-layer RMS spikes that precede them.

    After Wortsman, Dettmers et al. (2023), section 3.4: a loss spike tends to follow, 1-8 steps
    later, a step where some layer's squared gradient outran AdamW's second-moment estimate,

        RMS_t = sqrt(mean(g_t^2 / max(u_hat_t, eps^2))),  u_hat_t = exp_avg_sq / (1 - beta2^t),

    often in the patch embedding. The monitor computes RMS_t for every parameter (by qualified name)
    from the optimizer's state (torch Adam / AdamW, lowbit.StableAdamW, or any optimizer with
    `betas`, `eps` in its param groups and `exp_avg_sq`, `step` in its state) and raises events:

    - `rms_spike`: a layer's RMS rose well above its own recent history (`rms` thresholds);
    - `loss_spike`: the loss rose well above its recent level (`loss` thresholds); its
      `preceded_by` lists the RMS spikes of the `link_steps` steps before it;
    - `nonfinite_loss`: the loss is inf or NaN (also linked to preceding RMS spikes).

    Usage, one call per optimizer step, after `optimizer.step()` and before the gradients are
    cleared (RMS_t needs g_t and the u_t that already includes it)::

        mon = lowbit.SpikeMonitor(model, optimizer, jsonl="run/monitor.jsonl")
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            mon.step(loss)
            optimizer.zero_grad(set_to_none=True)
        mon.plot("run/spikes.png")
        mon.close()

    A call without an `optimizer.step()` since the previous one (GradScaler skipped an overflow)
    judges the loss only: RMS_t needs the u_t that includes g_t.

    `step` is the monitor's own count of `step()` calls, from 1. The loss passed at step t was
    computed before update t, so RMS spikes can only explain loss spikes at later steps; RMS spikes
    at the same step are not linked.

    Actions, taken when an event whose kind is in `act_on` occurs:

    - "log": record it only.
    - "skip": undo this step's update, restoring parameters and optimizer state (moments and step
      count) exactly as they were before `optimizer.step()`. The monitor registers an optimizer
      step pre-hook that copies them into buffers on their own device before every step: one more
      copy of parameters + state in memory and a device-to-device copy per step, no host sync. If
      the optimizer did not step (e.g. GradScaler skipped an overflow), there is nothing to undo.
    - "rollback": restore the last good model + optimizer state kept in memory, a full state_dict
      copy taken at construction and then every `snapshot_every` steps that raised no event.
      Hyperparameters (lr) are left as they are, so a schedule keeps its own clock.

    Cost: all RMS values and the loss are stacked on the device and moved to the host with one
    transfer per step, the only host sync; "rollback" snapshots on the CPU add one device-to-host
    copy each. Computing RMS reads every gradient and second moment once, a memory-bound pass
    that costs roughly half to one AdamW step on large tensors (measured on a CPU; the detectors
    add ~0.2 ms per step); `every=N` computes it every N steps instead.

    Checkpointing: `state_dict()` holds everything later decisions depend on (the step count, both
    detectors' windows, the RMS spikes a later loss spike may still link to, the events and, with
    `keep_history`, the history), as tensors and plain types (`torch.load(..., weights_only=True)`
    reads it). Save it with the model and optimizer between two `step()` calls; to resume, load
    the model and optimizer first, then build the monitor with `jsonl_mode="a"` and call
    `load_state_dict`: the resumed run then raises the same events, takes the same actions and
    writes the same JSONL lines as an unbroken one. The "rollback" snapshot (a copy of model and
    optimizer state) is not part of it, since the training checkpoint already holds that state:
    `load_state_dict` takes a fresh snapshot of the state just loaded, so until the next snapshot a
    rollback returns to the resumed step rather than to the unbroken run's last snapshot.

    Args:
        model: names the parameters (`model.named_parameters()`); saved by "rollback".
        optimizer: an Adam-family optimizer (see above).
        action: "log" | "skip" | "rollback".
        act_on: event kinds that trigger the action.
        loss: thresholds for the loss (see `RobustThreshold`).
        rms: thresholds for every layer's RMS.
        link_steps: a loss spike at step s is linked to RMS spikes at steps s - link_steps .. s - 1.
        every: compute RMS every this many steps (the loss is judged every step).
        snapshot_every: "rollback" keeps a snapshot from a step without events this often.
        snapshot_device: where "rollback" snapshots live: "cpu" or None (each tensor's device).
        jsonl: write one JSON line per step here (format in `lowbit.monitor.writers`).
        jsonl_mode: "x" starts a new file and refuses one that already holds lines (a new run never
            overwrites an old one's log); "w" starts the file afresh, replacing what it holds; "a"
            keeps its lines and appends (to resume a run: `load_state_dict` then drops the lines of
            steps after the restored one).
        tensorboard: a TensorBoard log dir (needs the `tensorboard` package).
        keep_history: keep losses and RMS values in memory for `plot()`.
        foreach: compute RMS with grouped `torch._foreach_*` calls (few kernel launches) or, False,
            one tensor at a time (cache-friendly, least temporary memory); None: foreach on CUDA.

    Raises:
        ValueError: for an unknown action, event kind or jsonl_mode, or a non-Adam-family optimizer.
        FileExistsError: for jsonl_mode "x" and a `jsonl` file that already holds lines.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        action: str = "log",
        act_on: tuple[str, ...] = ("loss_spike", "nonfinite_loss"),
        loss: RobustThreshold = DEFAULT_LOSS,
        rms: RobustThreshold = DEFAULT_RMS,
        link_steps: int = 8,
        every: int = 1,
        snapshot_every: int = 100,
        snapshot_device: str | torch.device | None = "cpu",
        jsonl: str | os.PathLike | None = None,
        jsonl_mode: str = "x",
        tensorboard: str | os.PathLike | None = None,
        keep_history: bool = True,
        foreach: bool | None = None,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        unknown = set(act_on) - set(KINDS)
        if unknown:
            raise ValueError(f"act_on kinds must be among {KINDS}, got {sorted(unknown)}")
        if jsonl_mode not in JSONL_MODES:
            raise ValueError(f"jsonl_mode must be one of {JSONL_MODES}, got {jsonl_mode!r}")
        if every < 1 or snapshot_every < 1 or link_steps < 0:
            raise ValueError("every and snapshot_every must be >= 1 and link_steps >= 0")
        self.model = model
        self.optimizer = optimizer
        self.action = action
        self.act_on = tuple(act_on)
        self.link_steps = link_steps
        self.every = every
        self.snapshot_every = snapshot_every

        self.signal = RMSSignal(model, optimizer, foreach=foreach)
        self.layer_names: list[str] = list(self.signal.names)
        self._loss_detector = RobustDetector(loss, 1)
        self._rms_detector = RobustDetector(rms, len(self.layer_names))
        self._recent_rms: deque[dict] = deque()

        self.step_count = 0
        self.events: list[dict] = []
        self.keep_history = keep_history
        self.history_steps: list[int] = []
        self.history_loss: list[float] = []
        self.history_rms_steps: list[int] = []
        self._history_rms: list[np.ndarray] = []

        self._param_layout = _param_layout(optimizer)
        self._writers: list[JsonlWriter | TensorBoardWriter] = []
        try:
            if jsonl is not None:
                self._writers.append(JsonlWriter(jsonl, mode=jsonl_mode))
            if tensorboard is not None:
                self._writers.append(TensorBoardWriter(tensorboard))
        except BaseException:
            for writer in self._writers:
                writer.close()
            raise
        # Hooks go on the optimizer last, so a constructor that fails leaves none behind.
        # Whether optimizer.step() ran since the last call: RMS_t is meaningless without the u_t that
        # includes g_t (e.g. GradScaler skipped an overflow step and the gradients hold infs).
        self._stepped = False
        self._closed = False
        self._checkpoint: Checkpoint | None = None
        if action == "rollback":
            self._checkpoint = Checkpoint(model, optimizer, device=snapshot_device)
            self._checkpoint.save(0)
        self._undo = StepUndo(optimizer) if action == "skip" else None
        self._post_hook = optimizer.register_step_post_hook(self._on_optimizer_step)

    # -- the per-step call -------------------------------------------------------------------------

    def step(self, loss: torch.Tensor | float) -> list[dict]:
        """Judges this step's loss and per-layer RMS, records them and acts on spikes.

        Call once per optimizer step, after `optimizer.step()` and before `zero_grad()`.

        Args:
            loss: this step's training loss (a scalar tensor, on any device, or a float).

        Returns:
            The events raised at this step (also appended to `self.events`); each carries the
            `action` taken ("log", "skip", "rollback", or "none" when there was nothing to undo).
        """
        if self._closed:
            raise RuntimeError(
                "SpikeMonitor.step after close(): its optimizer hooks are removed, so it can neither see "
                "optimizer steps nor undo them; build a new SpikeMonitor"
            )
        _check_loss(loss)
        if _param_layout(self.optimizer) != self._param_layout:
            raise RuntimeError(
                "SpikeMonitor: the optimizer's parameters changed since the monitor was built "
                "(add_param_group?); their RMS would go unwatched and 'skip'/'rollback' could not undo "
                "their steps. Build a new SpikeMonitor after changing the parameter groups."
            )
        self.step_count += 1
        step = self.step_count
        loss_value, rms_values, present = self._fetch(loss)

        events: list[dict] = []
        if rms_values is not None:
            spike, threshold = self._rms_detector.update(rms_values, np.asarray(present, dtype=bool))
            for i in np.flatnonzero(spike):
                events.append(
                    {
                        "step": step,
                        "kind": "rms_spike",
                        "layer": self.layer_names[i],
                        "value": float(rms_values[i]),
                        "threshold": float(threshold[i]),
                    }
                )

        # RMS spikes from steps before this one explain this step's loss (see the class docstring).
        while self._recent_rms and self._recent_rms[0]["step"] < step - self.link_steps:
            self._recent_rms.popleft()
        preceded_by = [dict(e) for e in self._recent_rms]
        if not math.isfinite(loss_value):
            events.append(
                {
                    "step": step,
                    "kind": "nonfinite_loss",
                    "value": loss_value,
                    "threshold": None,
                    "preceded_by": preceded_by,
                }
            )
        else:
            spike, threshold = self._loss_detector.update(np.array([loss_value]))
            if spike[0]:
                events.append(
                    {
                        "step": step,
                        "kind": "loss_spike",
                        "value": loss_value,
                        "threshold": float(threshold[0]),
                        "preceded_by": preceded_by,
                    }
                )
        self._recent_rms.extend(
            {"step": step, "layer": e["layer"], "value": e["value"]} for e in events if e["kind"] == "rms_spike"
        )

        action = self._act(step, events)
        for e in events:
            e["action"] = action if e["kind"] in self.act_on else "log"
        self.events.extend(events)
        self._record(step, loss_value, rms_values, present, events)
        return events

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._stepped = True

    def _fetch(self, loss: torch.Tensor | float) -> tuple[float, np.ndarray | None, list[bool]]:
        """The loss and (every `every` steps) all RMS values on the host, with one transfer."""
        compute_rms = self._stepped and self.step_count % self.every == 0
        self._stepped = False
        rms, present = self.signal.compute() if compute_rms else (None, [])
        if isinstance(loss, torch.Tensor):
            # In float64, so a float64 loss keeps its range and every loss dtype reads as a float would.
            loss_t = loss.detach().reshape(1).double()
            if rms is not None and loss_t.device == rms.device:
                host = torch.cat([rms.double(), loss_t]).cpu().numpy()  # the one host sync
                return float(host[-1]), host[:-1], present
            loss_value = float(loss_t.cpu())
        else:
            loss_value = float(loss)
        return loss_value, (rms.cpu().double().numpy() if rms is not None else None), present

    def _act(self, step: int, events: list[dict]) -> str:
        triggered = any(e["kind"] in self.act_on for e in events)
        if self._undo is not None:
            fresh, self._undo.fresh = self._undo.fresh, False
            if triggered:
                if not fresh:
                    return "none"  # the optimizer did not step since the last call: nothing to undo
                self._undo.restore()
                return "skip"
        if self._checkpoint is not None:
            if triggered:
                self._checkpoint.restore()
                return "rollback"
            if not events and step % self.snapshot_every == 0:
                self._checkpoint.save(step)
        return "log"

    def _record(
        self,
        step: int,
        loss_value: float,
        rms_values: np.ndarray | None,
        present: list[bool],
        events: list[dict],
    ) -> None:
        if self.keep_history:
            self.history_steps.append(step)
            self.history_loss.append(loss_value)
            if rms_values is not None:
                self.history_rms_steps.append(step)
                self._history_rms.append(rms_values.astype(np.float32))
        if self._writers:
            record: dict = {"step": step, "loss": loss_value}
            if rms_values is not None:
                record["rms"] = {
                    name: (float(v) if ok else None) for name, v, ok in zip(self.layer_names, rms_values, present)
                }
            record["events"] = events
            for writer in self._writers:
                writer.write(record)

    # -- checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What the monitor's later decisions depend on, as tensors and plain Python types.

        Call between two `step()` calls. Not included: the "rollback" snapshot (see the class
        docstring) and the configuration given to the constructor.

        Returns:
            A dict that `torch.save` writes and `torch.load(..., weights_only=True)` reads back.
        """
        state: dict = {
            "version": STATE_VERSION,
            "step_count": self.step_count,
            "layer_names": list(self.layer_names),
            "loss_detector": self._loss_detector.state_dict(),
            "rms_detector": self._rms_detector.state_dict(),
            "recent_rms": copy.deepcopy(list(self._recent_rms)),
            "events": copy.deepcopy(self.events),
            "history": None,
        }
        if self.keep_history:
            rms = (
                torch.from_numpy(np.stack(self._history_rms))
                if self._history_rms
                else torch.zeros((0, len(self.layer_names)), dtype=torch.float32)
            )
            state["history"] = {
                "steps": torch.tensor(self.history_steps, dtype=torch.int64),
                "loss": torch.tensor(self.history_loss, dtype=torch.float64),
                "rms_steps": torch.tensor(self.history_rms_steps, dtype=torch.int64),
                "rms": rms,  # (steps with RMS, layers)
            }
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state_dict()`'s state: call after loading the model and optimizer.

        Also drops the JSONL lines (and TensorBoard events) of steps after the restored one, which
        the resumed run writes again, and, for "rollback", snapshots the model and optimizer as
        they are now. A state saved without history leaves this monitor's history empty.

        Args:
            state: a dict from `state_dict()`.

        Raises:
            ValueError: if the state is from another layout version, another set of layers, or
                detectors with another window.
        """
        # Everything is checked and converted before anything is assigned: a state that does not
        # fit leaves this monitor as it was.
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"SpikeMonitor state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved_names = list(state["layer_names"])
        if saved_names != self.layer_names:
            first = next(
                (i for i, (a, b) in enumerate(zip(saved_names, self.layer_names)) if a != b),
                min(len(saved_names), len(self.layer_names)),
            )
            saved = saved_names[first] if first < len(saved_names) else "(none)"
            here = self.layer_names[first] if first < len(self.layer_names) else "(none)"
            raise ValueError(
                f"SpikeMonitor state was saved for other layers ({len(saved_names)} saved, "
                f"{len(self.layer_names)} here); first difference at position {first}: {saved!r} saved, "
                f"{here!r} here"
            )
        loss_detector, rms_detector = copy.deepcopy(self._loss_detector), copy.deepcopy(self._rms_detector)
        loss_detector.load_state_dict(state["loss_detector"])
        rms_detector.load_state_dict(state["rms_detector"])
        history = state["history"] if self.keep_history else None
        if history:  # tensors may have been loaded onto a GPU (map_location)
            history = {name: t.detach().cpu() for name, t in history.items()}

        self._loss_detector, self._rms_detector = loss_detector, rms_detector
        self.step_count = int(state["step_count"])
        self._recent_rms = deque(copy.deepcopy(state["recent_rms"]))
        self.events = copy.deepcopy(state["events"])
        self.history_steps = history["steps"].tolist() if history else []
        self.history_loss = history["loss"].tolist() if history else []
        self.history_rms_steps = history["rms_steps"].tolist() if history else []
        self._history_rms = list(history["rms"].numpy().astype(np.float32)) if history else []
        self._stepped = False
        if self._undo is not None:
            self._undo.fresh = False
        if self._checkpoint is not None:
            self._checkpoint.save(self.step_count)
        for writer in self._writers:
            writer.truncate_after(self.step_count)

    # -- after the fact ------------------------------------------------------------------------------

    @property
    def history_rms(self) -> np.ndarray:
        """Per-layer RMS kept so far, shape (layers, steps with RMS); NaN where a layer had none."""
        if not self._history_rms:
            return np.zeros((len(self.layer_names), 0), dtype=np.float32)
        return np.stack(self._history_rms, axis=1)

    @property
    def last_snapshot_step(self) -> int | None:
        """The step of the state "rollback" would restore (0: the state at construction)."""
        return self._checkpoint.step if self._checkpoint is not None else None

    def summary(self) -> dict:
        """Event counts by kind, loss-spike onsets (first step of each run of spikes), and links."""
        counts = {kind: sum(e["kind"] == kind for e in self.events) for kind in KINDS}
        spike_steps = sorted({e["step"] for e in self.events if e["kind"] == "loss_spike"})
        onsets = [s for s in spike_steps if s - 1 not in spike_steps]
        linked = sum(bool(e["preceded_by"]) for e in self.events if e["kind"] == "loss_spike")
        return {**counts, "loss_spike_onsets": len(onsets), "loss_spikes_preceded": linked}

    def plot(
        self, path: str | os.PathLike, *, title: str | None = None, step_range: tuple[int, int] | None = None
    ) -> Path:
        """Writes the loss curve (spikes marked) above the per-layer RMS heat map as a PNG.

        Args:
            path: the PNG file (written atomically).
            title: figure title.
            step_range: (first, last) steps to draw, to zoom into a spike; None: the whole run.

        Returns:
            The path written.

        Raises:
            ImportError: if matplotlib is not installed.
            RuntimeError: if the monitor was built with keep_history=False.
        """
        from lowbit.monitor.plot import plot_spikes  # matplotlib only when a plot is asked for

        if not self.keep_history:
            raise RuntimeError("SpikeMonitor(keep_history=False) has nothing to plot")
        return plot_spikes(
            path,
            steps=self.history_steps,
            losses=self.history_loss,
            layer_names=self.layer_names,
            rms_steps=self.history_rms_steps,
            rms=self.history_rms,
            events=self.events,
            title=title,
            step_range=step_range,
        )

    def sync(self) -> None:
        """Forces the JSONL written so far to disk (fsync) and flushes TensorBoard.

        Call before saving a checkpoint that holds `state_dict()`, so that after a crash the log on
        disk is never behind the checkpoint it resumes from.
        """
        for writer in self._writers:
            writer.sync()

    def close(self) -> None:
        """Flushes and closes the writers and removes the monitor's optimizer hooks; `step` then raises."""
        self._closed = True
        for writer in self._writers:
            writer.close()
        self._writers = []
        self._post_hook.remove()
        if self._undo is not None:
            self._undo.remove()
            self._undo = None

    def __enter__(self) -> SpikeMonitor:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
