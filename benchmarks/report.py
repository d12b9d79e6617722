"""report.md and the speed-up plots, from a run's records.

`python benchmarks/report.py DIR` rebuilds both from DIR/results.jsonl (e.g. after editing this file).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root holds the `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # its kernels/ cannot shadow anything

from benchmarks.common import Record, read_jsonl

__all__ = ["Target", "evaluate_targets", "plot_linear", "write_report"]

CPU_NOTE = (
    "**CPU run: these figures are not the target.** SwitchBack's int8 matmuls, the Triton kernels "
    "and float8 are built for GPU tensor cores; on the CPU the int8 path runs lowbit's plain-torch "
    "reference, and shapes are small. Use a CPU run to check that the suite works, not to compare speed."
)

SWITCHBACK = "switchback"


@dataclass(frozen=True)
class Target:
    name: str
    status: str  # "met" | "not met" | "not measured"
    detail: str


# ----------------------------------------------------------------------------------------------
# Targets (from the issue)


def _ok(records: Iterable[Record], **where) -> list[Record]:
    return [r for r in records if r.status == "ok" and all(getattr(r, k) == v for k, v in where.items())]


def _verdict(values: Sequence[float], floor: float) -> str:
    return "not measured" if not values else "met" if min(values) >= floor else "not met"


def evaluate_targets(records: Sequence[Record]) -> list[Target]:
    targets = []

    # 1. SwitchBack fwd+bwd >= 1.3x nn.Linear at d >= 1280 and 32k tokens.
    rows = [
        r for r in _ok(records, bench="linear", impl=SWITCHBACK)
        if r.case.endswith("fwd+bwd") and r.shape["d"] >= 1280 and r.shape["tokens"] == 32768
        and r.speedup is not None
    ]
    detail = ", ".join(f"{r.case.removesuffix(' fwd+bwd')} d={r.shape['d']}: {r.speedup:.2f}x" for r in rows)
    targets.append(Target(
        "SwitchBack fwd+bwd >= 1.3x nn.Linear (bf16, d >= 1280, 32k tokens; paper's A100: "
        "27% time saved at d=1280, 32% at d=4096; int8 tensor-core limit 1.5x)",
        _verdict([r.speedup for r in rows], 1.3), detail or "no such shapes in this run",
    ))

    # 2. SwitchBack ahead of torchao's int8 mixed-precision training (fwd+bwd, every shape).
    ours = {r.key(): r for r in _ok(records, bench="linear", impl=SWITCHBACK) if r.case.endswith("fwd+bwd")}
    theirs = {r.key(): r for r in _ok(records, bench="linear", impl="torchao-int8-mp") if r.case.endswith("fwd+bwd")}
    ratios = [theirs[k].median_ms / ours[k].median_ms for k in ours.keys() & theirs.keys()]
    detail = (
        f"SwitchBack faster in {sum(x > 1 for x in ratios)}/{len(ratios)} fwd+bwd shapes; "
        f"torchao time / SwitchBack time from {min(ratios):.2f} to {max(ratios):.2f}"
        if ratios else "no shape measured for both"
    )
    targets.append(Target("SwitchBack ahead of torchao int8 training (fwd+bwd)",
                          _verdict(ratios, 1.0 + 1e-9), detail))

    # 3. Quantize kernels >= 80% of copy bandwidth (the Triton kernels; torch-ref is informative).
    rows = [r for r in _ok(records, bench="quantize", impl="triton") if "frac_of_copy_bw" in r.extra]
    fracs = [r.extra["frac_of_copy_bw"] for r in rows]
    worst = min(rows, key=lambda r: r.extra["frac_of_copy_bw"]) if rows else None
    detail = (
        f"{len(rows)} kernel x shape measurements; lowest {worst.extra['frac_of_copy_bw']:.0%} "
        f"({worst.case}, {worst.shape['rows']}x{worst.shape['cols']})"
        if worst else "Triton kernels not timed in this run (they need a CUDA GPU)"
    )
    targets.append(Target("Quantize kernels >= 80% of copy bandwidth", _verdict(fracs, 0.8), detail))

    # 4. StableAdamW within 10% of fused AdamW: speedup = fused time / ours >= 1 / 1.1.
    rows = [r for r in _ok(records, bench="optimizer", impl="lowbit-stableadamw") if r.speedup is not None]
    detail = ", ".join(f"{r.shape['params']}: {1 / r.speedup:.2f}x fused AdamW's time" for r in rows)
    targets.append(Target("StableAdamW step within 10% of fused AdamW",
                          _verdict([r.speedup for r in rows], 1 / 1.1), detail or "not measured"))
    return targets


# ----------------------------------------------------------------------------------------------
# Markdown


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "" if x is None else f"{x:{spec}}{suffix}"


def _cell(r: Record | None, *parts: str) -> str:
    """A table cell: the requested figures of an ok record, else its status."""
    if r is None:
        return ""
    if r.status != "ok":
        return r.status
    text = {
        "ms": _fmt(r.median_ms, ".3f", " ms"),
        "speedup": _fmt(r.speedup, ".2f", "x"),
        "gbps": _fmt(r.gbps, ".1f", " GB/s"),
        "tflops": _fmt(r.tflops, ".2f", " TFLOP/s"),
        "copy": _fmt(r.extra.get("frac_of_copy_bw"), ".0%", " of copy"),
        "samples": _fmt(r.samples_per_s, ".1f", " samples/s"),
        "mem": _fmt(r.peak_mem_mb, ".0f", " MB"),
    }
    figures = [text[p] for p in parts if text[p]]
    return figures[0] + (f" ({', '.join(figures[1:])})" if len(figures) > 1 else "") if figures else "ok"


def _impls_with_ok(records: Sequence[Record]) -> list[str]:
    seen: dict[str, bool] = {}
    for r in records:
        seen[r.impl] = seen.get(r.impl, False) or r.status == "ok"
    return [impl for impl, ok in seen.items() if ok]


def _pivot(records, row_key, parts) -> tuple[list[str], list[list[str]]]:
    """Rows keyed by `row_key(record)` (a tuple), one column per implementation with an ok record."""
    impls = _impls_with_ok(records)
    rows: dict[tuple, dict[str, Record]] = defaultdict(dict)
    for r in records:
        rows[row_key(r)][r.impl] = r
    body = [[*key, *(_cell(cells.get(impl), *parts) for impl in impls)] for key, cells in rows.items()]
    return impls, body


def _section_linear(records: list[Record]) -> list[str]:
    intro = (
        "Median time (speed-up against nn.Linear in the same run). "
        "Memory: peak above weights and inputs during one fwd+bwd (GPU only)."
    )
    lines = ["## Linear layers and MLP block", "", intro, ""]
    cases = list(dict.fromkeys(r.case for r in records))
    for case in cases:
        rows = [r for r in records if r.case == case]
        impls, body = _pivot(rows, lambda r: (r.shape["tokens"], r.shape["d"]), ("ms", "speedup"))
        if not impls:
            continue
        lines += [f"### {case}", ""] + _table(["tokens", "d", *impls], body)
        if case.endswith("fwd+bwd") and any(r.peak_mem_mb is not None for r in rows):
            impls, body = _pivot(rows, lambda r: (r.shape["tokens"], r.shape["d"]), ("mem",))
            lines += [f"Peak memory, {case}:", ""] + _table(["tokens", "d", *impls], body)
    return lines


# Measured implementation -> the roofline case that models it (benchmarks/roofline.py).
_MODELLED = {"nn.Linear": "nn_linear", "switchback": "switchback", "switchback-row": "switchback_rowwise",
             "switchback-memeff": "switchback_mem_efficient"}


def roofline_gpu(device: str) -> str | None:
    """The roofline table's entry for a device name ("NVIDIA H100 80GB HBM3" -> "H100"), or None."""
    from benchmarks.roofline import GPUS

    return next((name for name in GPUS if name in device), None)


def _section_predicted(records: list[Record], device: str) -> list[str]:
    """The roofline model's time of each single-layer fwd+bwd next to the measured median."""
    gpu = roofline_gpu(device)
    rows = [r for r in _ok(records) if r.case.startswith("layer ") and r.case.endswith("fwd+bwd")
            and r.impl in _MODELLED]
    if gpu is None or not rows:
        return []
    from benchmarks.roofline import GPUS, predict, run

    models: dict[tuple, dict] = {}
    body = []
    for r in rows:
        key = (r.shape["tokens"], r.shape["in"], r.shape["out"])
        if key not in models:
            models[key] = run(*key)["cases"]
        predicted_ms = predict(models[key][_MODELLED[r.impl]]["launches"], GPUS[gpu]) * 1e3
        body.append([r.case, str(r.shape["tokens"]), f"{r.shape['in']} -> {r.shape['out']}", r.impl,
                     f"{r.median_ms:.3f}", f"{predicted_ms:.3f}", f"{r.median_ms / predicted_ms:.2f}"])
    intro = (f"The roofline model (`python -m benchmarks.roofline`, {gpu} peaks: a model, not a measurement) "
             "beside the measured median: measured / predicted is how far from its peak the code runs.")
    return ["## Measured against the roofline model", "", intro, ""] + _table(
        ["case", "tokens", "features", "impl", "measured ms", "predicted ms", "measured / predicted"], body)


def _section_quantize(records: list[Record]) -> list[str]:
    intro = (
        "Quantize: achieved GB/s (bytes read + written, each once) and the fraction of the "
        "bandwidth of `y.copy_(x)` on the same shape. GEMM: TFLOP/s (speed-up against torch.mm)."
    )
    lines = ["## Quantize kernels and the int8 GEMM", "", intro, ""]
    copies = [r for r in records if r.case == "copy"]
    for case in dict.fromkeys(r.case for r in records):
        if case == "copy":
            continue
        rows = [r for r in records if r.case == case]
        if case.startswith("int8_matmul"):
            key, parts, head = (lambda r: (r.shape["tokens"], r.shape["in"], r.shape["out"])), ("tflops", "speedup"), [
                "tokens", "in", "out"]
        else:
            rows = copies + rows
            key, parts, head = (lambda r: (r.shape["rows"], r.shape["cols"])), ("gbps", "copy"), ["rows", "cols"]
        impls, body = _pivot(rows, key, parts)
        if impls:
            lines += [f"### {case}", ""] + _table([*head, *impls], body)
    return lines


def _section_optimizer(records: list[Record]) -> list[str]:
    impls, body = _pivot(
        records, lambda r: (r.shape["params"], f"{r.shape['n_params'] / 1e6:.1f}M", r.shape["n_tensors"]),
        ("ms", "speedup", "gbps"),
    )
    if not impls:
        return []
    return ["## Optimizer step", "",
            "Median `step()` time (speed-up against fused AdamW, GB/s at 28 bytes per parameter).", ""] + \
        _table(["params", "size", "tensors", *impls], body)


def _section_clip(records: list[Record]) -> list[str]:
    impls, body = _pivot(records, lambda r: (r.shape["model"], r.shape["batch"]), ("ms", "speedup", "samples", "mem"))
    if not impls:
        return []
    return ["## CLIP training step", "",
            "Median step time (speed-up against nn.Linear, samples/s, peak memory allocated).", ""] + \
        _table(["model", "batch", *impls], body)


def _section_not_run(records: Sequence[Record]) -> list[str]:
    groups: dict[tuple, int] = defaultdict(int)
    for r in records:
        if r.status != "ok":
            groups[(r.bench, r.impl, r.status, r.reason)] += 1
    if not groups:
        return []
    rows = [(b, i, s, n, reason.replace("|", "\\|")) for (b, i, s, reason), n in groups.items()]
    return ["## Skipped and failed", ""] + _table(["bench", "impl", "status", "count", "reason"], rows)


def _header(env: dict, records: Sequence[Record], settings: dict | None) -> list[str]:
    packages = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v)
    lines = [
        "# lowbit benchmarks", "",
        f"- device: **{env['device']}**" + (f" (sm {env['capability']})" if env.get("capability") else ""),
        f"- torch {env['torch']}, triton {env.get('triton')}, python {env.get('python')}",
        f"- packages: {packages}",
        f"- commit: `{env['commit']}`, lowbit backend: {env.get('lowbit_backend')}",
        f"- date: {env.get('timestamp')}",
    ]
    if env["device_type"] != "cuda" and env.get("load_avg"):
        lines.append(f"- CPU load average (1/5/15 min) at the start: {env['load_avg']}")
    if settings:
        lines.append("- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    counts = defaultdict(int)
    for r in records:
        counts[r.status] += 1
    lines.append("- records: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    lines.append("")
    if env["device_type"] != "cuda":
        lines += ["> " + CPU_NOTE, ""]
    return lines


def _section_targets(targets: Sequence[Target], cpu: bool) -> list[str]:
    rows = [(t.name, t.status + (" (CPU: not the target)" if cpu and t.status != "not measured" else ""), t.detail)
            for t in targets]
    return ["## Targets", ""] + _table(["target", "status", "detail"], rows)


def render_markdown(records: Sequence[Record], env: dict, settings: dict | None = None) -> str:
    by_bench: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_bench[r.bench].append(r)
    lines = _header(env, records, settings)
    lines += _section_targets(evaluate_targets(records), env["device_type"] != "cuda")
    lines += _section_linear(by_bench["linear"]) if by_bench["linear"] else []
    if env["device_type"] == "cuda":
        lines += _section_predicted(by_bench["linear"], env["device"])
    lines += _section_quantize(by_bench["quantize"]) if by_bench["quantize"] else []
    lines += _section_optimizer(by_bench["optimizer"]) if by_bench["optimizer"] else []
    lines += _section_clip(by_bench["clip_step"]) if by_bench["clip_step"] else []
    lines += _section_not_run(records)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in text.replace("+", "-").replace("->", "-"))
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


def plot_linear(records: Sequence[Record], out_dir: Path, env: dict) -> list[Path]:
    """Speed-up against d, one panel per token count, one line per implementation (paper's Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    linear = [r for r in records if r.bench == "linear" and r.status == "ok" and r.speedup is not None]
    paths = []
    for case in dict.fromkeys(r.case for r in linear):
        rows = [r for r in linear if r.case == case and r.impl != r.baseline]
        tokens = sorted({r.shape["tokens"] for r in rows})
        if not tokens:
            continue
        fig, axes = plt.subplots(1, len(tokens), figsize=(4.2 * len(tokens), 3.6), sharey=True, squeeze=False)
        for ax, t in zip(axes[0], tokens):
            for impl in dict.fromkeys(r.impl for r in rows):
                points = sorted((r.shape["d"], r.speedup) for r in rows if r.impl == impl and r.shape["tokens"] == t)
                if points:
                    ax.plot(*zip(*points), marker="o", label=impl)
            ax.axhline(1.0, color="gray", lw=1)
            if case.endswith("fwd+bwd"):
                ax.axhline(1.3, color="gray", lw=1, ls=":", label="target 1.3x")
            dims = sorted({r.shape["d"] for r in rows})
            ax.set_xscale("log", base=2)
            ax.set_xticks(dims, [str(d) for d in dims])
            ax.minorticks_off()
            ax.set_title(f"{t} tokens")
            ax.set_xlabel("dimension d")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("speed-up over nn.Linear (x)")
        axes[0][-1].legend(fontsize=7, loc="best")
        cpu = " - CPU, not the target" if env["device_type"] != "cuda" else ""
        fig.suptitle(f"{case}: {rows[0].dtype}, {env['device']}{cpu}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"linear_{_slug(case)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------


def write_report(records: Sequence[Record], env: dict, out_dir: Path, settings: dict | None = None) -> list[Path]:
    """Write out_dir/report.md and the PNG plots; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "report.md"
    report.write_text(render_markdown(records, env, settings), encoding="utf-8")
    return [report, *plot_linear(records, out_dir, env)]


def main(argv: list[str] | None = None) -> None:
    out_dir = Path((argv if argv is not None else sys.argv[1:])[0])
    env = json.loads((out_dir / "env.json").read_text(encoding="utf-8"))
    settings = env.pop("settings", None)
    for path in write_report(read_jsonl(out_dir / "results.jsonl"), env, out_dir, settings):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
