"""Run open_clip's own training script with lowbit layers, StableAdamW and the SpikeMonitor.

    python -m lowbit.open_clip_train --lowbit-precision switchback --lowbit-optimizer stableadamw \\
        --lowbit-monitor [every open_clip_train flag]

runs `open_clip_train.main.main` unchanged. Written against open_clip_torch 3.3.0
(open_clip_train/main.py and train.py). For the run only (restored when it ends), four names that
main.py imported into its own namespace are replaced by wrappers around them:

- `create_model_and_transforms`: its first call builds the model to train; `lowbit.swap` follows,
  before DDP wrapping and before the optimizer is built. (A --distill teacher, built by a later
  call, is left as it is.)
- `optim` (torch.optim): `optim.AdamW(groups, lr=, betas=, eps=)` builds `lowbit.StableAdamW` with
  the same parameter groups (so open_clip's weight-decay exclusions) and hyperparameters; its lr
  scheduler then drives StableAdamW as it would AdamW.
- `pt_load`: reads checkpoints with `torch.load(..., weights_only=True)` (never unpickling) and
  takes the monitor's state out of them.
- `train_one_epoch`: builds the SpikeMonitor at the first epoch (after any --resume has loaded the
  model and optimizer), and hands open_clip a loss function that remembers each step's loss.

train_one_epoch calls `optimizer.zero_grad()` at the top of its loop, so the monitor is stepped from
an optimizer step post-hook, where the gradients of the step are still there. Its state goes into
open_clip's checkpoints through an optimizer `state_dict` post-hook, under
`checkpoint["optimizer"]["lowbit_monitor"]`, and `--resume` continues it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

import lowbit
from lowbit.integrations._judge import judge_step_loss
from lowbit.monitor.monitor import ACTIONS
from lowbit.nn.attention import LowbitMultiheadAttention
from lowbit.nn.base import LowbitLinear

logger = logging.getLogger("lowbit.open_clip_train")

OPEN_CLIP_VERSION = "3.3.0"  # the open_clip_torch this was written against
MONITOR_KEY = "lowbit_monitor"  # in checkpoint["optimizer"]
MONITOR_JSONL = "lowbit_monitor.jsonl"  # in open_clip's log folder (--logs/--name)
MONITOR_PLOT = "lowbit_spikes.png"
FILTERS = {"default": None, "all": lowbit.ALL}  # None: lowbit.swap's default_filter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lowbit.open_clip_train",
        description="open_clip_train with lowbit layers, StableAdamW and the SpikeMonitor; every other "
        "flag goes to open_clip_train.",
    )
    parser.add_argument(
        "--lowbit-precision",
        choices=lowbit.layer_names(),
        default=None,
        help="swap the model's linear / attention layers for this lowbit layer",
    )
    parser.add_argument(
        "--lowbit-filter",
        choices=sorted(FILTERS),
        default=None,
        help="which layers to swap: 'default' (lowbit.swap's default_filter, the default) or 'all'; "
        "needs --lowbit-precision",
    )
    parser.add_argument(
        "--lowbit-optimizer",
        choices=["stableadamw"],
        default=None,
        help="replace open_clip's AdamW by lowbit.StableAdamW (same groups, lr schedule)",
    )
    parser.add_argument(
        "--lowbit-clip-threshold",
        type=float,
        default=None,
        help="StableAdamW's clip_threshold (default 1.0); needs --lowbit-optimizer",
    )
    parser.add_argument(
        "--lowbit-monitor",
        action="store_true",
        help=f"run lowbit.SpikeMonitor; JSONL and plot in open_clip's log folder ({MONITOR_JSONL})",
    )
    parser.add_argument(
        "--lowbit-monitor-action",
        choices=ACTIONS,
        default=None,
        help="what the monitor does on a loss spike (default 'log'); needs --lowbit-monitor",
    )
    return parser


def refusals(options: argparse.Namespace, open_clip_args: argparse.Namespace) -> list[str]:
    """Why these flags cannot run together (empty: they can)."""
    lowbit_used = options.lowbit_precision or options.lowbit_optimizer or options.lowbit_monitor
    problems = []
    if lowbit_used and open_clip_args.use_bnb_linear is not None:
        problems.append("--use-bnb-linear replaces the same linear layers as lowbit; use --lowbit-precision instead")
    if options.lowbit_precision and open_clip_args.torchscript:
        problems.append("--torchscript: lowbit layers are custom autograd Functions, which TorchScript cannot script")
    opt = getattr(open_clip_args, "opt", "adamw").lower()
    if options.lowbit_optimizer and opt != "adamw":
        problems.append(f"--lowbit-optimizer replaces open_clip's AdamW, but --opt {opt} was given")
    if options.lowbit_monitor and open_clip_args.horovod:
        problems.append("--lowbit-monitor does not support --horovod (use torchrun)")
    # A flag that modifies another one would otherwise be accepted and do nothing.
    for flag, value, needs, needed in (
        ("--lowbit-filter", options.lowbit_filter, "--lowbit-precision", options.lowbit_precision),
        ("--lowbit-clip-threshold", options.lowbit_clip_threshold, "--lowbit-optimizer", options.lowbit_optimizer),
        ("--lowbit-monitor-action", options.lowbit_monitor_action, "--lowbit-monitor", options.lowbit_monitor),
    ):
        if value is not None and not needed:
            problems.append(f"{flag} needs {needs}, without which it would do nothing")
    return problems


_DEFAULTS = {"lowbit_filter": "default", "lowbit_clip_threshold": 1.0, "lowbit_monitor_action": "log"}


def main(argv: list[str]) -> int | None:
    from open_clip_train.params import parse_args

    parser = build_parser()
    options, rest = parser.parse_known_args(argv)
    problems = refusals(options, parse_args(list(rest)))
    if problems:
        parser.error("; ".join(problems))  # exits with status 2
    for name, default in _DEFAULTS.items():  # None above tells "not given" from "given as the default"
        if getattr(options, name) is None:
            setattr(options, name, default)
    run = _Run(options)
    with run.patched():
        return run.open_clip_main(rest)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        for name in ("module", "_orig_mod"):
            inner = getattr(model, name, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def layer_counts(model: nn.Module) -> tuple[int, int]:
    """(lowbit layers, all layers), counting as lowbit.swap does: an nn.MultiheadAttention with its
    out_proj is one layer, every other nn.Linear one."""
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    layers = [
        m for m in model.modules()
        if isinstance(m, nn.MultiheadAttention) or (isinstance(m, nn.Linear) and id(m) not in inside_attention)
    ]  # fmt: skip
    low = [m for m in layers if isinstance(m, (LowbitLinear, LowbitMultiheadAttention))]
    return len(low), len(layers)


def _example_batch(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random images and token sequences of the sizes an open_clip CLIP model takes."""
    param = next(model.parameters())
    size = getattr(model.visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(2, 3, *size, device=param.device, dtype=param.dtype)
    texts = torch.randint(0, getattr(model, "vocab_size", 49408), (2, getattr(model, "context_length", 77)),
                          device=param.device)
    return images, texts


def log_coverage(model: nn.Module) -> None:
    """Layers swapped, and the share of linear FLOPs that ran in low precision on an example batch."""
    swapped, total = layer_counts(model)
    logger.info(f"lowbit: {swapped} of {total} nn.Linear / nn.MultiheadAttention layers are lowbit layers")
    try:
        images, texts = _example_batch(model)
        with torch.no_grad():
            report = lowbit.coverage(model, images, texts)
    except Exception as error:  # a model this function cannot feed: say so, do not stop the run
        logger.warning(f"lowbit: coverage not measured ({type(error).__name__}: {error})")
        return
    uncovered = [layer.name for layer in report.uncovered]
    logger.info(
        f"lowbit: {100 * report.low_precision_fraction:.1f} % of linear FLOPs run in low precision "
        f"(lowbit.coverage on 2 random image/text pairs)"
        + (f"; not covered: {', '.join(uncovered[:10])}" if uncovered else "")
    )


class _LossTap:
    """open_clip's loss, remembering the last total loss it returned (train_one_epoch sums the dict)."""

    def __init__(self, loss, run: _Run) -> None:
        self.loss = loss
        self.run = run

    def __call__(self, *args, **kwargs):
        out = self.loss(*args, **kwargs)
        total = sum(out.values()) if isinstance(out, dict) else out
        self.run.saw_loss(total.detach())
        return out


class _Run:
    """One run of open_clip_train.main.main with the lowbit options."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.model_built = False
        self.monitor: lowbit.SpikeMonitor | None = None
        self.plot_path: str | None = None  # set with the monitor
        self.monitor_state: dict | None = None  # from the checkpoint --resume loaded
        self.optimizer: torch.optim.Optimizer | None = None
        self.hooks: list = []
        self.busy = False  # inside the monitor: its own optimizer.state_dict() calls get no monitor state
        self.pending_loss: torch.Tensor | None = None
        self.loss_calls = 0
        self.accum_freq = 1

    # -- patching open_clip_train.main for the run ---------------------------------------------------

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        import open_clip_train.main as oc_main

        version = _open_clip_version()
        if version != OPEN_CLIP_VERSION:
            logger.warning(
                f"lowbit.open_clip_train was written against open_clip_torch {OPEN_CLIP_VERSION}, this is {version}"
            )
        self.open_clip_main = oc_main.main
        replaced = {
            "create_model_and_transforms": self.wrap_create_model(oc_main.create_model_and_transforms),
            "pt_load": self.wrap_pt_load(),
            "train_one_epoch": self.wrap_train_one_epoch(oc_main.train_one_epoch),
        }
        if self.options.lowbit_optimizer:
            replaced["optim"] = _StableAdamWOptim(self.options.lowbit_clip_threshold)
        saved = {name: getattr(oc_main, name) for name in replaced}
        for name, value in replaced.items():
            setattr(oc_main, name, value)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(oc_main, name, value)
            self.close()

    def wrap_create_model(self, create_model_and_transforms):
        def create_and_swap(*args, **kwargs):
            model, preprocess_train, preprocess_val = create_model_and_transforms(*args, **kwargs)
            if not self.model_built:  # the model to train; a later call builds a --distill teacher
                self.model_built = True
                precision = self.options.lowbit_precision
                if precision:
                    logger.info(f"lowbit: swapping to {precision!r} (--lowbit-filter {self.options.lowbit_filter})")
                    model = lowbit.swap(model, precision, filter_fn=FILTERS[self.options.lowbit_filter])
                    log_coverage(model)
                else:
                    logger.info("lowbit: no --lowbit-precision, the model keeps its layers")
            return model, preprocess_train, preprocess_val

        return create_and_swap

    def wrap_pt_load(self):
        def pt_load(file_path, map_location=None):
            import fsspec

            with fsspec.open(file_path, "rb") as f:
                checkpoint = torch.load(f, map_location=map_location, weights_only=True)
            optimizer_state = checkpoint.get("optimizer") if isinstance(checkpoint, dict) else None
            if isinstance(optimizer_state, dict) and MONITOR_KEY in optimizer_state:
                state = optimizer_state.pop(MONITOR_KEY)
                if self.options.lowbit_monitor:
                    self.monitor_state = state
                    logger.info(f"lowbit: {file_path} holds SpikeMonitor state at step {state['step_count']}")
                else:
                    logger.warning(f"lowbit: {file_path} holds SpikeMonitor state; ignored without --lowbit-monitor")
            elif self.options.lowbit_monitor:
                logger.warning(f"lowbit: {file_path} holds no SpikeMonitor state; the monitor starts afresh")
            return checkpoint

        return pt_load

    def wrap_train_one_epoch(self, train_one_epoch):
        def train_one_epoch_monitored(
            model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None
        ):
            if not self.options.lowbit_monitor:
                return train_one_epoch(
                    model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=tb_writer
                )
            if self.monitor is None:
                self.start_monitor(model, optimizer, args)
            try:
                return train_one_epoch(
                    model,
                    data,
                    _LossTap(loss, self),
                    epoch,
                    optimizer,
                    scaler,
                    scheduler,
                    dist_model,
                    args,
                    tb_writer=tb_writer,
                )
            finally:
                self.flush_skipped_step()
                self.monitor.sync()
                if self.plot_path:
                    try:
                        self.monitor.plot(self.plot_path)
                    except ImportError as error:
                        logger.warning(f"lowbit: no monitor plot ({error}); pip install matplotlib")

        return train_one_epoch_monitored

    # -- the monitor -----------------------------------------------------------------------------------

    def start_monitor(self, model: nn.Module, optimizer: torch.optim.Optimizer, args) -> None:
        log_dir = os.path.join(args.logs, args.name) if args.save_logs else None
        jsonl = os.path.join(log_dir, MONITOR_JSONL) if log_dir else None
        self.plot_path = os.path.join(log_dir, MONITOR_PLOT) if log_dir else None
        if log_dir is None:
            logger.info("lowbit: this process writes no monitor JSONL or plot (--logs none, or not the master rank)")
        self.accum_freq = args.accum_freq
        self.busy = True
        try:
            self.monitor = lowbit.SpikeMonitor(
                _unwrap(model),
                optimizer,
                action=self.options.lowbit_monitor_action,
                jsonl=jsonl,
                jsonl_mode="a" if self.monitor_state is not None else "x",  # never over an old log
            )
            if self.monitor_state is not None:
                self.monitor.load_state_dict(self.monitor_state)
        finally:
            self.busy = False
        self.optimizer = optimizer
        # After the monitor's own post-hook, which records that the optimizer stepped.
        self.hooks.append(optimizer.register_step_post_hook(self.after_optimizer_step))
        self.hooks.append(optimizer.register_state_dict_post_hook(self.add_monitor_state))
        resumed = f", resumed at step {self.monitor.step_count}" if self.monitor_state is not None else ""
        logger.info(
            f"lowbit: SpikeMonitor(action={self.options.lowbit_monitor_action!r}) on "
            f"{len(self.monitor.layer_names)} parameters, JSONL {jsonl}{resumed}"
        )

    def saw_loss(self, loss: torch.Tensor) -> None:
        # Each optimizer step sees accum_freq loss calls; one more means the last step did not happen
        # (GradScaler skipped an overflow): the monitor judges that step's loss alone.
        if self.loss_calls == self.accum_freq:
            self.flush_skipped_step()
        self.pending_loss = loss
        self.loss_calls += 1

    def flush_skipped_step(self) -> None:
        if self.pending_loss is not None:
            logger.info(f"lowbit: monitor step {self.monitor.step_count + 1} had no optimizer step; loss judged alone")
            self.step_monitor()

    def after_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self.pending_loss is None:
            logger.warning("lowbit: optimizer stepped without a loss seen since the last step; monitor not stepped")
            return
        self.step_monitor()

    def step_monitor(self) -> None:
        loss, self.pending_loss, self.loss_calls = self.pending_loss, None, 0
        self.busy = True
        try:
            judge_step_loss(self.monitor, loss, logger)
        finally:
            self.busy = False

    def add_monitor_state(self, optimizer, state_dict: dict) -> dict | None:
        if self.monitor is None or self.busy:
            return None
        self.monitor.sync()  # the JSONL on disk is never behind the checkpoint
        state_dict[MONITOR_KEY] = self.monitor.state_dict()
        return state_dict

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        if self.monitor is not None:
            self.monitor.close()


class _StableAdamWOptim:
    """Stands for torch.optim in open_clip_train.main: its `AdamW(...)` builds lowbit.StableAdamW."""

    def __init__(self, clip_threshold: float) -> None:
        self.clip_threshold = clip_threshold

    def __getattr__(self, name: str):
        return getattr(torch.optim, name)

    def AdamW(self, params, **kwargs):  # noqa: N802 - the name open_clip calls
        optimizer = lowbit.StableAdamW(params, clip_threshold=self.clip_threshold, **kwargs)
        groups = optimizer.param_groups
        logger.info(
            f"lowbit: StableAdamW(lr={kwargs.get('lr')}, betas={kwargs.get('betas')}, eps={kwargs.get('eps')}, "
            f"weight_decay per group={[g['weight_decay'] for g in groups]}, clip_threshold={self.clip_threshold}) "
            f"replaces open_clip's AdamW, same {len(groups)} parameter groups "
            f"({[len(g['params']) for g in groups]} tensors)"
        )
        return optimizer


def _open_clip_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("open_clip_torch")
    except PackageNotFoundError:
        return "unknown"
