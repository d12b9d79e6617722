"""lowbit.SpikeMonitor in the Hugging Face Trainer (written against transformers 5.24).

    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    add_spike_monitor(trainer, jsonl="out/monitor.jsonl")
    trainer.train()

The Trainer calls `optimizer.step()` and then `model.zero_grad()`, with the callback event
`on_optimizer_step` between them: the monitor steps there, while the step's gradients are still
there. Callbacks are not given the loss, so `add_spike_monitor` also wraps this trainer object's
`training_step` (the instance, not the class) to hand each micro-batch's loss to the callback; the
monitor judges their sum over the step, the quantity the Trainer itself adds up and logs (under
torch.distributed, its mean over the ranks, so every rank takes the same action; only the world's
process zero writes the JSONL, TensorBoard and plot).

The monitor is built at the first `on_pre_optimizer_step`, once the Trainer has built (or, on
resume, loaded) the optimizer. At every checkpoint its state goes to `checkpoint-N/lowbit_monitor.pt`;
pass `resume_from=` the checkpoint folder you resume from to continue it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import lowbit
from lowbit.integrations._judge import judge_step_loss
from lowbit.io import atomic_path

logger = logging.getLogger("lowbit.integrations.transformers")

STATE_FILE = "lowbit_monitor.pt"  # in each checkpoint-N folder


class SpikeMonitorCallback(TrainerCallback):
    """Steps a lowbit.SpikeMonitor after each optimizer step of a Trainer.

    Args:
        resume_from: a checkpoint folder holding `lowbit_monitor.pt` to continue from (the JSONL is
            then appended to, from the step it holds).
        plot: where `monitor.plot` writes its PNG at the end of training (None: no plot).
        **monitor_kwargs: for `lowbit.SpikeMonitor` (jsonl=, action=, ...).
    """

    def __init__(
        self, *, resume_from: str | os.PathLike | None = None, plot: str | os.PathLike | None = None, **monitor_kwargs
    ) -> None:
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.plot_path = plot
        self.monitor_kwargs = monitor_kwargs
        self.monitor: lowbit.SpikeMonitor | None = None
        self.step_loss: torch.Tensor | None = None
        self.is_main = True  # the world's process zero, which writes the logs (set at the first step)

    def record_loss(self, loss: torch.Tensor) -> None:
        """Called with each micro-batch's loss (add_spike_monitor arranges it)."""
        loss = loss.detach()
        self.step_loss = loss if self.step_loss is None else self.step_loss + loss

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.monitor is None:
            self.is_main = state.is_world_process_zero
            self.monitor = self._build(model, optimizer, state.global_step, args.output_dir)

    def _build(self, model, optimizer, global_step: int = 0, output_dir: str | None = None) -> lowbit.SpikeMonitor:
        state = None
        if self.resume_from is not None:
            path = self.resume_from / STATE_FILE
            if path.is_file():
                state = torch.load(path, map_location="cpu", weights_only=True)
            else:
                logger.warning(f"lowbit: {path} not found; the SpikeMonitor starts afresh")
        # The monitor counts the Trainer's optimizer steps (checkpoint-N holds its state at step N), so a
        # Trainer resumed at another step than the monitor's state would renumber the JSONL's steps.
        monitor_step = int(state["step_count"]) if state is not None else 0
        if monitor_step != global_step:
            where = os.path.join(output_dir or "", f"{PREFIX_CHECKPOINT_DIR}-{global_step}")
            raise ValueError(
                f"lowbit: the Trainer resumes at step {global_step} but the SpikeMonitor at step {monitor_step} "
                f"(resume_from={self.resume_from}); pass add_spike_monitor(..., resume_from={where!r}), the "
                "checkpoint the Trainer resumes from"
            )
        kwargs = dict(self.monitor_kwargs)
        if not self.is_main:  # one process writes the JSONL and TensorBoard logs; every rank judges the same
            kwargs.pop("jsonl", None)
            kwargs.pop("tensorboard", None)
        if state is not None:
            kwargs["jsonl_mode"] = "a"
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        monitor = lowbit.SpikeMonitor(model, optimizer, **kwargs)
        if state is not None:
            monitor.load_state_dict(state)
            logger.info(f"lowbit: SpikeMonitor resumed at step {monitor.step_count} from {self.resume_from}")
        return monitor

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.step_loss is None:
            logger.warning(
                "lowbit: no loss seen for this optimizer step (add_spike_monitor not used?); "
                "the SpikeMonitor was not stepped"
            )
            return
        loss, self.step_loss = self.step_loss, None
        judge_step_loss(self.monitor, loss, logger)

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self.monitor.sync()
        with atomic_path(folder / STATE_FILE) as tmp:
            torch.save(self.monitor.state_dict(), tmp)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        if self.plot_path is not None and self.is_main:
            try:
                self.monitor.plot(self.plot_path)
            except ImportError as error:
                logger.warning(f"lowbit: no SpikeMonitor plot ({error}); pip install matplotlib")
        self.monitor.close()
        self.monitor = None


def add_spike_monitor(trainer: Trainer, **kwargs) -> SpikeMonitorCallback:
    """Adds a SpikeMonitorCallback to `trainer` and routes its losses to it.

    Args:
        trainer: a transformers Trainer (before `train()`).
        **kwargs: for SpikeMonitorCallback (resume_from=, plot=) and lowbit.SpikeMonitor (jsonl=, ...).

    Returns:
        The callback; `callback.monitor` is the SpikeMonitor once training has started.
    """
    callback = SpikeMonitorCallback(**kwargs)
    training_step = trainer.training_step

    def training_step_recorded(*args, **kw):
        loss = training_step(*args, **kw)
        callback.record_loss(loss)
        return loss

    trainer.training_step = training_step_recorded
    trainer.add_callback(callback)
    return callback
