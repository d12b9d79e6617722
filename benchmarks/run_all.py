"""Run lowbit's benchmarks and write results.jsonl, report.md and the speed-up plots.

    python benchmarks/run_all.py                  # full suite, for a GPU -> benchmarks/results/<device>/
    python benchmarks/run_all.py --preset gpu-quick  # the headline cases in minutes, for a short GPU lease
    python benchmarks/run_all.py --quick          # small shapes, minutes on a CPU (not the target)
    python benchmarks/run_all.py --quick --out /tmp/bench_quick --only linear quantize

Benchmarks: linear (bench_linear.py), quantize (bench_quantize.py), optimizer
(bench_optimizer.py), clip_step (bench_clip_step.py). An implementation that is missing or
fails is recorded with status "skipped" or "error" and its reason; the suite goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root holds the `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # its kernels/ cannot shadow anything

import torch

from benchmarks import bench_clip_step, bench_linear, bench_optimizer, bench_quantize
from benchmarks.common import (
    REPO_ROOT,
    Env,
    Record,
    Recorder,
    Settings,
    TimerConfig,
    collect_env,
    dtype_name,
    write_jsonl,
)
from benchmarks.report import evaluate_targets, write_report

BENCHES = {
    "linear": bench_linear.run,
    "quantize": bench_quantize.run,
    "optimizer": bench_optimizer.run,
    "clip_step": bench_clip_step.run,
}
PRESETS = ("full", "gpu-quick", "quick", "smoke")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_settings(preset: str, device: torch.device, args: argparse.Namespace | None = None) -> Settings:
    """The preset's shapes and timer, with any command-line overrides applied."""
    cuda = device.type == "cuda"
    # bf16 is what a GPU trains in; the CPU's bf16 matmuls are slow emulations, so fp32 there.
    dtype = torch.bfloat16 if cuda else torch.float32
    if preset == "full":
        dims, tokens = (768, 1024, 1280, 1664, 2048, 4096), (8192, 16384, 32768, 65536)
        kw = {
            "timer": TimerConfig(warmup_ms=25, rep_ms=100),
            "optim_sets": ("ViT-B", "ViT-H"),
            # Batches that fit 80 GB in bf16 autocast with fp32 AdamW state.
            "clip_models": (("ViT-B-32", 256), ("ViT-L-14", 64), ("ViT-H-14", 32)),
        }
    elif preset == "gpu-quick":  # the headline cases, under 5 minutes on an H100 (autotuning included)
        dims, tokens = (1024, 1280, 4096), (32768,)
        kw = {
            "timer": TimerConfig(warmup_ms=10, rep_ms=40),
            "passes": ("fwd+bwd",),
            "linear_kinds": ("layer d->4d", "layer 4d->d"),
            "optim_sets": ("ViT-B",),
            "clip_models": (("ViT-B-32", 128),),
            "clip_timer": TimerConfig(warmup_ms=500.0, rep_ms=2000.0, min_reps=5, min_warmup=3, max_reps=20,
                                      gpu_events=True),
        }
    elif preset == "quick":
        dims, tokens = (64, 128), (256, 512)
        kw = {
            "timer": TimerConfig(warmup_ms=10, rep_ms=50, min_reps=5, max_reps=200, min_warmup=3),
            "optim_sets": ("tiny",),
            "clip_models": ((bench_clip_step.TINY, 8),),
            "clip_timer": TimerConfig(warmup_ms=0, rep_ms=200, min_reps=5, max_reps=20, min_warmup=2),
        }
    elif preset == "smoke":  # the test suite's: every code path once, in seconds
        dims, tokens = (32,), (64,)
        kw = {
            "timer": TimerConfig(warmup_ms=0, rep_ms=0, min_reps=2, max_reps=2),
            "passes": ("fwd", "fwd+bwd"),
            "linear_kinds": ("layer d->4d", "mlp d->4d->d"),
            "optim_sets": ("tiny",),
            "clip_models": ((bench_clip_step.TINY, 2),),
            "clip_timer": TimerConfig(warmup_ms=0, rep_ms=0, min_reps=1, max_reps=1),
        }
    else:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")

    if args is not None:
        dims = tuple(args.dims) if args.dims else dims
        tokens = tuple(args.tokens) if args.tokens else tokens
        dtype = DTYPES[args.dtype] if args.dtype else dtype
        if args.passes:
            kw["passes"] = tuple(args.passes)
        if args.impls:
            kw["impls"] = tuple(args.impls)
        if args.clip_models:
            kw["clip_models"] = tuple(_parse_clip_model(s) for s in args.clip_models)
    return Settings(
        preset=preset, device=device, dtype=dtype, dims=dims, tokens=tokens,
        quant_shapes=tuple((t, d) for t in tokens for d in dims), **kw,
    )


def _parse_clip_model(text: str) -> tuple[str, int]:
    name, _, batch = text.rpartition(":")
    if not name or not batch.isdigit():
        raise argparse.ArgumentTypeError(f"--clip-models takes NAME:BATCH, e.g. ViT-B-32:256, got {text!r}")
    return name, int(batch)


def _settings_summary(s: Settings) -> dict:
    return {
        "preset": s.preset, "dtype": dtype_name(s.dtype), "dims": list(s.dims), "tokens": list(s.tokens),
        "passes": list(s.passes), "optim_sets": list(s.optim_sets),
        "clip_models": [f"{n}:{b}" for n, b in s.clip_models], "impls": list(s.impls) if s.impls else "all",
        "timer": dataclasses.asdict(s.timer),
    }


def default_out_dir(env: Env, preset: str) -> Path:
    """benchmarks/results/<device>[-gpu-quick]/ for a GPU run; a temporary folder for anything else."""
    if env.is_cuda and preset in ("full", "gpu-quick"):
        return REPO_ROOT / "benchmarks" / "results" / (env.slug if preset == "full" else f"{env.slug}-{preset}")
    return Path(tempfile.gettempdir()) / "lowbit-bench" / f"{env.slug}-{preset}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes: minutes on a CPU")
    p.add_argument("--preset", choices=PRESETS,
                   help="full (default), gpu-quick (headline cases), quick (= --quick) or smoke (tests)")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device>/ for a "
                   "full GPU run, else a temporary folder)")
    p.add_argument("--only", nargs="+", choices=list(BENCHES), metavar="NAME",
                   help=f"run only these benchmarks: {', '.join(BENCHES)}")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), help="activation dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--dims", nargs="+", type=int, help="override the model dimensions d")
    p.add_argument("--tokens", nargs="+", type=int, help="override the token counts (batch x sequence)")
    p.add_argument("--passes", nargs="+", choices=["fwd", "bwd", "fwd+bwd"], help="linear passes to time")
    p.add_argument("--impls", nargs="+", help="only these implementations (baselines always run)")
    p.add_argument("--clip-models", nargs="+", metavar="NAME:BATCH", help="open_clip models and batch sizes")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 for --quick on a CPU)")
    p.add_argument("--quiet", action="store_true", help="no line per measurement")
    args = p.parse_args(argv)
    if args.quick and args.preset not in (None, "quick"):
        p.error("--quick conflicts with --preset " + args.preset)
    args.preset = "quick" if args.quick else args.preset or "full"
    return args


def main(argv: list[str] | None = None) -> Path:
    """Run the suite; returns the output folder."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # Tensor cores for any fp32 matmul too (the optimizer and fp32 parts of the CLIP step).
            torch.backends.cuda.matmul.allow_tf32 = True
        elif args.threads or args.preset != "full":
            # One thread unless asked: on a shared CPU, OpenMP threads that spin-wait for each other
            # while descheduled make steps 10-100x slower and the timings noise.
            torch.set_num_threads(args.threads or 1)
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _run(args: argparse.Namespace, device: torch.device) -> Path:
    settings = make_settings(args.preset, device, args)
    env = collect_env(device)
    out_dir = args.out or default_out_dir(env, args.preset)
    out_dir.mkdir(parents=True, exist_ok=True)

    print(f"lowbit benchmarks: preset {settings.preset} on {env.device}, {dtype_name(settings.dtype)}, "
          f"torch {env.torch}, triton {env.triton}, commit {env.commit}")
    if not env.is_cuda:
        print("NOTE: CPU run. CPU figures are not the target: the int8 / fp8 paths are built for GPU tensor "
              f"cores; this run checks that the suite works (load average {env.load_avg}).")
        if settings.preset == "full":
            print("WARNING: the full suite's shapes on a CPU take hours; use --quick.")

    summary = _settings_summary(settings)
    (out_dir / "env.json").write_text(
        json.dumps({**dataclasses.asdict(env), "settings": summary}, indent=2), encoding="utf-8"
    )
    records: list[Record] = []
    timings = {}
    for name in args.only or list(BENCHES):
        start = time.perf_counter()
        rec = Recorder(name, env, settings.dtype, verbose=not args.quiet)
        try:
            BENCHES[name](settings, rec)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not lose the others' rows
            rec.error("(benchmark)", "(all)", {}, exc)
        records += rec.records
        timings[name] = time.perf_counter() - start
        write_jsonl(records, out_dir / "results.jsonl")  # after each benchmark: a crash keeps the rest

    paths = write_report(records, dataclasses.asdict(env), out_dir, summary)
    _print_summary(records, timings, out_dir, paths)
    return out_dir


def _print_summary(records: list[Record], timings: dict, out_dir: Path, paths: list[Path]) -> None:
    print("\n== summary ==")
    for name, seconds in timings.items():
        counts = {s: sum(r.bench == name and r.status == s for r in records) for s in ("ok", "skipped", "error")}
        print(f"{name:10s} {seconds:7.1f} s   " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    for target in evaluate_targets(records):
        print(f"target: {target.name}: {target.status.upper()} - {target.detail}")
    print(f"wrote {out_dir / 'results.jsonl'}")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
