"""What every benchmark shares: the environment, the timer, the memory probe and the result record.

On a GPU a measurement is `triton.testing.do_bench` (CUDA events, L2 cache flushed between runs)
with the 20th / 50th / 80th percentiles; on the CPU it is a warm-up then repeated `perf_counter`
runs, reduced the same way. Every figure reported is a median.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
QUANTILES = (0.5, 0.2, 0.8)  # median first: do_bench returns them in this order

# Packages whose versions go into the report (distribution names, as pip knows them).
PACKAGES = ("torchao", "bitsandbytes", "open_clip_torch", "torch-optimi", "pytorch_optimizer", "lowbit")


# ----------------------------------------------------------------------------------------------
# Environment


@dataclass(frozen=True)
class Env:
    """Where and with what a run was made; copied into every record and the report's header."""

    device: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu: x86_64 (2 threads)"
    device_type: str  # "cuda" | "cpu"
    capability: str | None  # CUDA compute capability, "9.0"
    torch: str
    triton: str | None
    commit: str  # short hash, "+dirty" when tracked files differ from it
    python: str
    lowbit_backend: str
    packages: dict[str, str | None]
    timestamp: str
    load_avg: tuple[float, float, float] | None = None  # 1/5/15-minute load: how shared the CPU was

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    @property
    def slug(self) -> str:
        """The device name as a folder name: benchmarks/results/<slug>/."""
        name = self.device.split(":")[0] if not self.is_cuda else self.device
        return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """HEAD's short hash, with "+dirty" when tracked files have uncommitted changes; without git (a copy
    of the tree on a lent GPU), $LOWBIT_COMMIT, as benchmarks/gpu_session.sh is told it."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LOWBIT_COMMIT", "unknown")
    return commit + ("+dirty" if dirty else "")


def collect_env(device: torch.device) -> Env:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        capability = f"{major}.{minor}"
    else:
        threads = torch.get_num_threads()
        name = f"cpu: {platform.machine() or 'unknown'} ({threads} thread{'s' if threads != 1 else ''})"
        capability = None
    from lowbit import get_backend

    return Env(
        device=name,
        device_type=device.type,
        capability=capability,
        torch=torch.__version__,
        triton=_version("triton"),
        commit=git_commit(),
        python=platform.python_version(),
        lowbit_backend=get_backend(),
        packages={dist: _version(dist) for dist in PACKAGES},
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        load_avg=tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )


def has_fp8(device: torch.device) -> bool:
    """Float8 tensor cores: compute capability 8.9 (Ada) or later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class TimerConfig:
    """How long to warm up and to measure (ms). On a GPU, do_bench's warmup / rep by default.

    `gpu_events=True` times on a GPU with CUDA events instead, honouring min_reps / min_warmup:
    for steps of a second, where do_bench's time budget would leave two or three runs.
    """

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 3  # at least this many timed runs, whatever rep_ms says (not with do_bench)
    min_warmup: int = 1  # at least this many warm-up runs: first calls pay for lazy init (idem)
    max_reps: int = 1000  # (idem)
    gpu_events: bool = False


@dataclass(frozen=True)
class Settings:
    """What a run measures. `run_all.make_settings` builds the "full", "quick" and "smoke" presets."""

    preset: str
    device: torch.device
    dtype: torch.dtype
    timer: TimerConfig
    # linear
    dims: tuple[int, ...]
    tokens: tuple[int, ...]
    passes: tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")
    linear_kinds: tuple[str, ...] = ("layer d->4d", "layer 4d->d", "mlp d->4d->d")
    # quantize: (rows, cols) of the activations quantized
    quant_shapes: tuple[tuple[int, int], ...] = ()
    # optimizer: parameter sets, keys of bench_optimizer.PARAM_SETS
    optim_sets: tuple[str, ...] = ("ViT-B", "ViT-H")
    # clip step: (open_clip model name, batch size); "tiny" builds a small CLIP in-process
    clip_models: tuple[tuple[str, int], ...] = ()
    clip_timer: TimerConfig = TimerConfig(warmup_ms=1000.0, rep_ms=5000.0, min_reps=10, min_warmup=3,
                                          max_reps=50, gpu_events=True)
    impls: tuple[str, ...] | None = None  # None: every implementation; else only these (and baselines)

    def wants(self, impl: str, baseline: str) -> bool:
        return self.impls is None or impl == baseline or impl in self.impls


# ----------------------------------------------------------------------------------------------
# Timing and memory


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n_reps: int | None  # None where do_bench chose it


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def _quantile(sorted_ms: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, as torch.quantile does."""
    pos = q * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def _time_cuda_events(fn, device, timer: TimerConfig, grad_to_none) -> Timing:
    """CUDA-event timing: for long steps, and for a GPU machine without Triton."""
    for _ in range(timer.min_warmup):
        fn()
    synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    synchronize(device)
    estimate = max(start.elapsed_time(end), 1e-3)
    for _ in range(int(timer.warmup_ms / estimate)):
        fn()
    n_reps = min(timer.max_reps, max(timer.min_reps, int(timer.rep_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n_reps)]
    for start, end in events:
        _clear_grads(grad_to_none)
        start.record()
        fn()
        end.record()
    synchronize(device)
    times = sorted(start.elapsed_time(end) for start, end in events)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


def _time_cpu(fn, timer: TimerConfig, grad_to_none) -> Timing:
    deadline = time.perf_counter() + timer.warmup_ms / 1e3
    runs = 0
    while runs < timer.min_warmup or time.perf_counter() < deadline:
        fn()
        runs += 1
    times: list[float] = []
    deadline = time.perf_counter() + timer.rep_ms / 1e3
    while len(times) < timer.max_reps and (len(times) < timer.min_reps or time.perf_counter() < deadline):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    timer: TimerConfig,
    *,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> Timing:
    """Time `fn` on `device`: median and 20th / 80th percentiles in ms.

    `grad_to_none`: tensors whose .grad is reset before each timed run, so a backward allocates
    its gradients (as in training after zero_grad(set_to_none=True)) instead of accumulating.
    """
    if device.type != "cuda":
        return _time_cpu(fn, timer, grad_to_none)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is None or timer.gpu_events:
        return _time_cuda_events(fn, device, timer, grad_to_none)
    median, p20, p80 = do_bench(
        fn, warmup=timer.warmup_ms, rep=timer.rep_ms, grad_to_none=list(grad_to_none or []) or None,
        quantiles=list(QUANTILES),
    )
    return Timing(median, p20, p80, None)


def free_memory(device: torch.device) -> None:
    """Drop what the previous implementation left behind, so peaks are measured per implementation.

    Only on CUDA: CPU tensors go with their last reference, and a full collection costs a third of
    a second once torchao and bitsandbytes are imported.
    """
    if device.type == "cuda":
        gc.collect()  # reference cycles (autograd graphs held by exceptions, modules) hold GPU memory
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class MemoryProbe:
    """Allocated memory above a starting point, on CUDA (None elsewhere: no allocator statistics)."""

    device: torch.device
    start: int = 0

    def __enter__(self) -> MemoryProbe:  # noqa: PYI034 - a plain class, never subclassed
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        return None

    def now_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return (torch.cuda.memory_allocated(self.device) - self.start) / 2**20

    def peak_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20

    def total_peak_mb(self) -> float | None:
        """The peak of everything allocated, resident weights and optimizer state included."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) / 2**20


# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class Record:
    """One measurement (or one implementation that could not be measured), one line of results.jsonl."""

    bench: str  # "linear" | "quantize" | "optimizer" | "clip_step"
    case: str  # what was run, e.g. "layer d->4d fwd+bwd"
    impl: str  # which implementation, e.g. "nn.Linear", "switchback"
    shape: dict[str, Any]
    dtype: str
    device: str
    device_type: str
    torch: str
    triton: str | None
    commit: str
    status: str = "ok"  # "ok" | "skipped" | "error"
    reason: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    n_reps: int | None = None
    tflops: float | None = None
    gbps: float | None = None
    samples_per_s: float | None = None
    baseline: str | None = None  # the implementation `speedup` is measured against
    speedup: float | None = None  # baseline median / this median, same case and shape, same run
    peak_mem_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> tuple[str, str, str]:
        return self.bench, self.case, json.dumps(self.shape, sort_keys=True)


RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Record))


class Skip(Exception):
    """Raised inside a measurement to record it as skipped, with the message as the reason."""


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


class Recorder:
    """Collects one benchmark's records, filling in the environment, and prints one line for each."""

    def __init__(self, bench: str, env: Env, dtype: torch.dtype | str, *, verbose: bool = True):
        self.bench = bench
        self.env = env
        self.dtype = dtype if isinstance(dtype, str) else dtype_name(dtype)
        self.verbose = verbose
        self.records: list[Record] = []

    def _new(self, case: str, impl: str, shape: dict, **fields) -> Record:
        record = Record(
            bench=self.bench, case=case, impl=impl, shape=dict(shape),
            dtype=fields.pop("dtype", self.dtype), device=self.env.device,
            device_type=self.env.device_type, torch=self.env.torch, triton=self.env.triton,
            commit=self.env.commit, **fields,
        )
        self.records.append(record)
        if self.verbose:
            print(_describe(record), flush=True)
        return record

    def ok(
        self, case: str, impl: str, shape: dict, timing: Timing, *,
        flops: float | None = None, bytes_moved: float | None = None, samples: int | None = None,
        **fields,
    ) -> Record:
        seconds = timing.median_ms / 1e3
        return self._new(
            case, impl, shape, median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
            n_reps=timing.n_reps,
            tflops=flops / seconds / 1e12 if flops else None,
            gbps=bytes_moved / seconds / 1e9 if bytes_moved else None,
            samples_per_s=samples / seconds if samples else None,
            **fields,
        )

    def skip(self, case: str, impl: str, shape: dict, reason: str, **fields) -> Record:
        return self._new(case, impl, shape, status="skipped", reason=reason, **fields)

    def error(self, case: str, impl: str, shape: dict, exc: BaseException, **fields) -> Record:
        if os.environ.get("LOWBIT_BENCH_TRACEBACK"):
            traceback.print_exception(exc)
        return self._new(case, impl, shape, status="error", reason=_short(exc), **fields)

    def fail(self, case: str, impl: str, shape: dict, exc: BaseException, **fields) -> Record:
        """A Skip becomes a skipped record, anything else an error record."""
        if isinstance(exc, Skip):
            return self.skip(case, impl, shape, str(exc), **fields)
        return self.error(case, impl, shape, exc, **fields)


def _describe(r: Record) -> str:
    shape = " ".join(f"{k}={v}" for k, v in r.shape.items())
    head = f"[{r.bench}] {r.case} | {shape} | {r.impl}"
    if r.status != "ok":
        return f"{head}: {r.status.upper()} ({r.reason})"
    figures = [f"{r.median_ms:.3f} ms"]
    if r.tflops is not None:
        figures.append(f"{r.tflops:.2f} TFLOP/s")
    if r.gbps is not None:
        figures.append(f"{r.gbps:.1f} GB/s")
    if r.samples_per_s is not None:
        figures.append(f"{r.samples_per_s:.1f} samples/s")
    return f"{head}: " + ", ".join(figures)


def attach_speedups(records: Iterable[Record], baseline: str | Callable[[Record], str]) -> None:
    """Set `speedup` = baseline median / median for every ok record with an ok baseline of the same
    bench, case and shape. `baseline` names the baseline implementation, or picks it per record."""
    records = list(records)
    medians = {(r.key(), r.impl): r.median_ms for r in records if r.status == "ok"}
    for r in records:
        base = baseline(r) if callable(baseline) else baseline
        r.baseline = base
        base_ms = medians.get((r.key(), base))
        if r.status == "ok" and base_ms and r.median_ms:
            r.speedup = base_ms / r.median_ms


def write_jsonl(records: Iterable[Record], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dataclasses.asdict(r), default=str) + "\n" for r in records)


def read_jsonl(path: Path) -> list[Record]:
    with open(path, encoding="utf-8") as f:
        return [Record(**json.loads(line)) for line in f if line.strip()]


def optional_import(module: str, install_hint: str):
    """The module, or Skip("... not installed (pip install ...)")."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{module} not installed ({install_hint}): {exc}") from None


def lowbit_attr(name: str, *fallback_modules: str):
    """`lowbit.<name>` if the package exports it yet, else from one of `fallback_modules`, else Skip.

    Parts of lowbit land in parallel; a benchmark of one that has not landed is skipped, not faked.
    """
    import lowbit

    obj = getattr(lowbit, name, None)
    for module in fallback_modules:
        if obj is not None:
            break
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError:
            obj = None
    if obj is None:
        raise Skip(f"lowbit.{name} is not available in this version of lowbit")
    return obj
