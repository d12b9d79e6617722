"""Where the monitor's records go: a JSONL file and, if installed, TensorBoard.

JSONL format: one line per monitored step, strict JSON (no NaN / Infinity tokens):

    {"step": 12, "loss": 2.31, "rms": {"visual.conv1.weight": 0.98, "head.bias": null, ...},
     "events": [{"step": 12, "kind": "loss_spike", "value": 5.1, "threshold": 2.9,
                 "preceded_by": [{"step": 9, "layer": "visual.conv1.weight", "value": 7.4}],
                 "action": "skip"}]}

`rms` is present only on steps where it was computed (every `every` steps); a layer without a
gradient or optimizer state that step is null. Non-finite numbers are written as the strings
"nan", "inf" and "-inf". Each line is written with one `write` and flushed, so a crash loses at
most the line being written and a reader can follow the file while training runs.

Modes: "x" (the default) starts a new file and refuses one that already holds lines, so a new
run never overwrites an earlier run's log; "w" replaces the file (asked for explicitly); "a" keeps
its lines and appends.

Resuming: open the file in mode "a" and call `truncate_after(step)` with the restored step (what
`SpikeMonitor.load_state_dict` does): the lines of later steps, which the resumed run is about to
write again, are dropped, so the file ends up as an unbroken run's.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

from lowbit.io import atomic_path

JSONL_MODES = ("x", "w", "a")


def to_json_safe(obj: Any) -> Any:
    """Recursively replaces non-finite floats by "nan" / "inf" / "-inf" (JSON has no such numbers)."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    return obj


class JsonlWriter:
    """Appends one JSON object per line to `path`, flushing each line.

    A write error warns once and disables the writer: a full disk should not end a training run.

    Args:
        path: the file to write.
        mode: "x" starts a new file, refusing one that holds lines (a new run); "w" truncates the
            file when opened (replacing a run, when asked); "a" keeps its lines and appends (a
            resumed run; see `truncate_after`).

    Raises:
        ValueError: for a mode other than "x", "w" or "a".
        FileExistsError: in mode "x", if `path` already holds lines.
    """

    def __init__(self, path: str | os.PathLike, *, mode: str = "x") -> None:
        if mode not in JSONL_MODES:
            raise ValueError(f"jsonl mode must be one of {JSONL_MODES}, got {mode!r}")
        self.path = os.fspath(path)
        self.mode = mode
        self._parent = os.path.dirname(os.path.abspath(self.path))
        if mode == "x" and os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
            raise FileExistsError(
                f"{self.path} already holds a run's log ({os.path.getsize(self.path)} bytes) and would be "
                "overwritten: to continue that run pass jsonl_mode='a' (and load_state_dict), to replace it "
                "jsonl_mode='w', or choose another path"
            )
        os.makedirs(self._parent, exist_ok=True)
        self._file = open(self.path, "w" if mode == "x" else mode, encoding="utf-8")  # noqa: SIM115 - closed in close()
        if mode == "a" and not _ends_a_line(self.path):
            self._file.write("\n")  # a torn last line (a crash mid-write) stays torn; the next starts anew
            self._file.flush()

    def truncate_after(self, step: int) -> None:
        """Drops the lines of steps after `step` (and torn lines), then goes on appending.

        The kept lines, byte for byte, go to a temporary file beside `path` that then replaces it
        (`os.replace`): a kill leaves either the old file or the new one, never half of one.
        """
        if self._file is None:
            return
        self._file.close()
        self._file = None
        try:
            # Line by line from the old file into the new one: a long run's log never sits in memory.
            with atomic_path(self.path) as tmp:
                with open(self.path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
                    for line in src:
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                            dst.write(line if line.endswith("\n") else line + "\n")
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as err:
            warnings.warn(
                f"SpikeMonitor: rewriting {self.path} failed ({err}); JSONL logging stopped",
                RuntimeWarning,
                stacklevel=2,
            )

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(to_json_safe(record), allow_nan=False) + "\n")
            self._file.flush()
        except OSError as err:
            warnings.warn(
                f"SpikeMonitor: writing {self.path} failed ({err}); JSONL logging stopped",
                RuntimeWarning,
                stacklevel=2,
            )
            self.close()

    def sync(self) -> None:
        """Forces the lines written so far to disk (fsync)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


def _ends_a_line(path: str) -> bool:
    """Whether the file is empty or ends with a newline."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a monitor JSONL file back; a torn last line (a crash mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class TensorBoardWriter:
    """Scalars `loss`, `rms/<layer>` and `quant_sqnr/<pass>/<layer>` (QuantHealth), and each event as
    text, via torch.utils.tensorboard.

    Args:
        log_dir: the TensorBoard run directory.

    Raises:
        ImportError: if the `tensorboard` package is not installed (with the fix in the message).
    """

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch raises this when the tensorboard package is missing
            raise ImportError("SpikeMonitor(tensorboard=...) needs `pip install tensorboard`") from err
        self._summary_writer = SummaryWriter
        self.log_dir = os.fspath(log_dir)
        self._writer = SummaryWriter(log_dir=self.log_dir)

    def truncate_after(self, step: int) -> None:
        """Reopens the run with `purge_step`: TensorBoard hides the earlier events after `step`."""
        self._writer.close()
        self._writer = self._summary_writer(log_dir=self.log_dir, purge_step=step + 1)

    def write(self, record: dict) -> None:
        step = record["step"]
        loss = record.get("loss")
        if loss is not None and math.isfinite(loss):
            self._writer.add_scalar("loss", loss, step)
        for name, value in (record.get("rms") or {}).items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(f"rms/{name}", value, step)
        for name, passes in (record.get("quant_sqnr") or {}).items():
            for which, value in passes.items():
                if value is not None and math.isfinite(value):
                    self._writer.add_scalar(f"quant_sqnr/{which}/{name}", value, step)
        for event in record.get("events", ()):
            self._writer.add_text(f"events/{event['kind']}", json.dumps(to_json_safe(event)), step)

    def sync(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
