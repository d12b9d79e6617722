"""QuantHealth: every N steps, each low-precision layer's forward and grad-input SQNR against the
exact fp64 matmul on the live batch, logged beside the SpikeMonitor's records and flagged (by
layer name) when it falls under a threshold, so an outlier weight or activation that appears
mid-run shows up the step it is sampled.

Usage, around the forward and backward of a step::

    health = lowbit.monitor.QuantHealth(model, monitor=mon)  # or jsonl=..., tensorboard=...
    for x, y in loader:
        with health.measure():
            loss = loss_fn(model(x), y)
            loss.backward()
        optimizer.step()
        mon.step(loss)

On a sampled step (the 1st, then every `every`-th) each call of a lowbit layer's `linear` is also
computed exactly in fp64 on its first `rows` rows, and, in backward, the layer's own grad-input
matmul is rerun on those rows against g @ w in fp64 (see `lowbit.sqnr_recorder`). Other steps run
nothing extra. Record, one JSONL line per sampled step (same file and step numbering as the
SpikeMonitor's when `monitor` is given; TensorBoard scalars `quant_sqnr/forward/<layer>` and
`quant_sqnr/grad_input/<layer>`)::

    {"step": 200, "quant_sqnr": {"blocks.0.mlp.fc1.weight": {"forward": 37.2, "grad_input": 41.0}, ...},
     "events": [{"step": 200, "kind": "low_quant_sqnr", "layer": "...", "pass": "forward",
                 "value": 12.9, "threshold": 20.0}]}

Cost: steps between samples run nothing extra. A sampled step adds fp64 matmuls on `rows` rows
per call and a rerun of grad-input on them; `benchmarks/bench_quant_health.py` (a swapped ViT-S/16,
2 blocks, 64 px, batch 8, on a loaded 2-core CPU) measured a sampled step at 0.96x a plain one
(medians of 3 interleaved steps: within the noise), so at the default every=100 the average cost
is under 0.1 % of a step; even a sampled step twice as long would average 1 %.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import contextmanager

from torch import nn

from lowbit.monitor.writers import JsonlWriter, TensorBoardWriter
from lowbit.sqnr_recorder import SqnrRecorder

__all__ = ["QuantHealth"]

logger = logging.getLogger("lowbit.monitor")

DEFAULT_THRESHOLD_DB = 20.0  # healthy int8 row-wise layers measure 33-45 dB, fp8 ~25-31 dB


class QuantHealth:
    """Samples each low-precision layer's SQNR every `every` steps and flags layers under a threshold.

    Args:
        model: the swapped model (its lowbit layers are found when a step is sampled).
        every: sample the 1st step and then every `every`-th.
        threshold_db: flag a layer whose forward or grad-input SQNR is below this.
        rows: rows of each call measured (x and g are quantized per row, so they are exact samples).
        grad: also measure grad-input (needs the backward inside `measure()`).
        monitor: a SpikeMonitor whose writers (JSONL / TensorBoard) and step count to share.
        jsonl, tensorboard: own writers, when no monitor is given.
        jsonl_mode: for `jsonl`: "x" (a new file; refuses one that holds lines), "w" (replace it) or
            "a" (append to it).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 100,
        threshold_db: float = DEFAULT_THRESHOLD_DB,
        rows: int = 256,
        grad: bool = True,
        monitor=None,
        jsonl: str | os.PathLike | None = None,
        tensorboard: str | os.PathLike | None = None,
        jsonl_mode: str = "x",
    ) -> None:
        if every < 1 or rows < 1:
            raise ValueError("every and rows must be >= 1")
        self.model = model
        self.every = every
        self.threshold_db = threshold_db
        self.rows = rows
        self.grad = grad
        self.monitor = monitor
        self.step_count = 0
        self.events: list[dict] = []
        self.last: dict[str, dict[str, float]] = {}
        self._own_writers = []
        if jsonl is not None:
            self._own_writers.append(JsonlWriter(jsonl, mode=jsonl_mode))
        if tensorboard is not None:
            self._own_writers.append(TensorBoardWriter(tensorboard))

    def next_step(self) -> int:
        """The step number the next `measure()` belongs to (the monitor's, which counts from 1)."""
        return (self.monitor.step_count if self.monitor is not None else self.step_count) + 1

    @contextmanager
    def measure(self):
        """Wrap one step's forward and backward; samples it when due (yields the recorder, or None)."""
        step = self.next_step()
        self.step_count += 1
        if (step - 1) % self.every:
            yield None
            return
        recorder = SqnrRecorder(self.model, grad=self.grad, rows=self.rows)
        with recorder:
            yield recorder
        self._report(recorder, step)

    def _report(self, recorder: SqnrRecorder, step: int) -> None:
        forward, grad = recorder.forward_db(), recorder.grad_db()
        values = {name: {"forward": db} for name, db in forward.items()}
        for name, db in grad.items():
            values.setdefault(name, {})["grad_input"] = db
        events = [
            {"step": step, "kind": "low_quant_sqnr", "layer": name, "pass": which, "value": db,
             "threshold": self.threshold_db}
            for name, passes in values.items() for which, db in passes.items()
            if not db >= self.threshold_db  # NaN counts as low
        ]
        self.last = values
        self.events.extend(events)
        if events:
            worst = sorted(events, key=lambda e: e["value"] if math.isfinite(e["value"]) else -math.inf)
            shown = ", ".join(f"{e['layer']} ({e['pass']} {e['value']:.1f} dB)" for e in worst[:10])
            message = (f"QuantHealth step {step}: {len(events)} low-precision matmuls under "
                       f"{self.threshold_db:g} dB SQNR: {shown}")
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        record = {"step": step, "quant_sqnr": values, "events": events}
        for writer in self._writers():
            writer.write(record)

    def _writers(self) -> list:
        shared = list(getattr(self.monitor, "_writers", [])) if self.monitor is not None else []
        return shared + self._own_writers

    def close(self) -> None:
        for writer in self._own_writers:
            writer.close()
        self._own_writers = []
