"""A CPU study of lowbit's block-scaled formats on the tiny CLIP (issue 16).

Trains `lowbit-tiny` on the synthetic set (examples/train_clip.py, in this process) for every cell of

    format  x  {no layer-scale, zero-init layer-scale (--ls-init)}  x  {StableAdamW, AdamW}  x  seeds

and reports, per cell, zero-shot top-1, the final loss, the SpikeMonitor's RMS / loss spikes and the
largest feature magnitudes of the final model; then, on the trained fp32 checkpoint (StableAdamW, no
layer-scale, first seed), each format's per-layer forward and grad-input SQNR (`lowbit.coverage`).

    python examples/formats_study.py --out runs-study --steps 140 --batch-size 128 --threads 1

OUT/runs/<cell>/ are train_clip run folders (plus features.json); OUT/study.json holds every number,
OUT/study.md the tables. An interrupted study continues with --resume (finished cells are skipped,
a cell with a checkpoint resumes from it); --overwrite replaces the study in OUT.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import clip_data  # beside this file, like train_clip
import open_clip
import torch
import train_clip
from torch import nn

import lowbit
from lowbit.io import atomic_write_text

FORMATS = ("fp32", "switchback-row", "mxfp8", "mxfp8-e5m2", "mxfp4", "nvfp4", "fp8-blockwise")
OPTIMIZERS = ("stableadamw", "adamw")
MODEL = "lowbit-tiny"
STUDY_FILES = ("study_config.json", "study.json", "study.md")  # what --overwrite removes, with runs/
# Settings a resumed study must share with the one it continues (else its cells would mix settings).
FIXED = ("formats", "steps", "batch_size", "warmup", "seeds", "other_seeds", "train_args", "probe_batch")


class StudyError(Exception):
    """A usage mistake: one line on stderr, exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the study's folder")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated train_clip precisions")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the StableAdamW, no-layer-scale cells")
    p.add_argument("--other-seeds", help="seeds of the other cells (default: --seeds)")
    p.add_argument("--steps", type=int, default=140, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per step")
    p.add_argument("--warmup", type=int, default=15, help="linear warmup steps (then cosine to 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--probe-batch", type=int, default=128, help="held-out pairs for features and SQNR")
    p.add_argument("--train-args", default="", help="more train_clip flags for every run, e.g. '--lr 1e-3'")
    p.add_argument("--resume", action="store_true", help="continue the study in --out (skip finished cells)")
    p.add_argument("--overwrite", action="store_true", help="replace the study in --out")
    args = p.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in args.formats if f not in train_clip.PRECISIONS]
    if unknown or not args.formats:
        raise StudyError(f"--formats: unknown {unknown}; choose from {', '.join(train_clip.PRECISIONS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.other_seeds = args.seeds if args.other_seeds is None else [int(s) for s in args.other_seeds.split(",")]
    except ValueError as err:
        raise StudyError(f"--seeds / --other-seeds: comma-separated integers ({err})") from None
    if args.resume and args.overwrite:
        raise StudyError("--resume continues the study in --out and --overwrite replaces it: pass one of them")
    return args


# -- the grid ------------------------------------------------------------------------------------------


def cells(args: argparse.Namespace) -> list[dict]:
    """Every (format, layer-scale, optimizer, seed) to run; the full seed list only where --seeds says."""
    grid = []
    for fmt in args.formats:
        for ls in (False, True):
            for opt in OPTIMIZERS:
                base = opt == "stableadamw" and not ls
                for seed in args.seeds if base else args.other_seeds:
                    name = f"{fmt}-{'ls0' if ls else 'nols'}-{opt}-s{seed}"
                    grid.append({"name": name, "format": fmt, "ls_init": ls, "optimizer": opt, "seed": seed})
    return grid


def train_argv(cell: dict, args: argparse.Namespace, folder: Path) -> list[str]:
    argv = [
        *("--model", MODEL, "--precision", cell["format"], "--optimizer", cell["optimizer"]),
        *("--seed", str(cell["seed"]), "--steps", str(args.steps), "--batch-size", str(args.batch_size)),
        *("--warmup", str(args.warmup), "--threads", str(args.threads), "--out", str(folder)),
        # checkpoint only at the end (the study reads it); quiet logs; no TensorBoard or plots
        *("--save-every", "0", "--log-every", str(args.steps), "--no-progress", "--no-tensorboard", "--no-plots"),
        *args.train_args.split(),
    ]
    if cell["ls_init"]:
        argv.append("--ls-init")
    if (folder / "checkpoint.pt").exists():
        argv += ["--resume", "auto"]  # killed after its checkpoint: finish from there
    elif folder.exists():
        argv.append("--overwrite")  # killed before its checkpoint: start again
    return argv


def run_cell(cell: dict, args: argparse.Namespace, runs: Path) -> dict:
    """Trains the cell unless its folder holds a finished run; measures its features once."""
    folder = runs / cell["name"]
    if not (folder / "summary.json").exists():
        try:
            train_clip.main(train_argv(cell, args, folder))
        except train_clip.StopRun as err:
            raise StudyError(f"{cell['name']}: train_clip.py: {err}") from err
    summary = json.loads((folder / "summary.json").read_text())
    if not (folder / "features.json").exists():
        features = measure_features(folder / "checkpoint.pt", cell, args)
        atomic_write_text(folder / "features.json", json.dumps(features, indent=1) + "\n")
    features = json.loads((folder / "features.json").read_text())
    spikes = summary["spike_summary"]
    return {
        **cell,
        "zero_shot_top1": summary["zero_shot_top1"],
        "final_loss": summary["final_loss_mean10"],
        "steps_done": summary["steps"],
        "rms_spikes": spikes["rms_spike"],
        "loss_spikes": spikes["loss_spike"],
        "nonfinite": spikes["nonfinite_loss"] + (not math.isfinite(summary["final_loss"])),
        "train_time_s": summary["train_time_s"],
        **features,
    }


# -- measurements on a trained model -------------------------------------------------------------------


def load_model(checkpoint: Path, fmt: str, ls_init: bool) -> nn.Module:
    """The trained model as train_clip built it (same swap), weights from its checkpoint."""
    model = train_clip.create_model(MODEL, ls_init=ls_init)
    if fmt in train_clip.LOWBIT_LAYERS:
        lowbit.swap(model, fmt, filter_fn=train_clip.swap_filter(model, False))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state)
    return model.eval()


def probe_batch(model: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n held-out ("val") synthetic pairs: the same images and captions for every model."""
    size, mean, std = train_clip.Transform(model, train=False).synthetic
    data = clip_data.SyntheticShapes(n, size, split="val", seed=0, mean=mean, std=std)
    images, tokens, _, _ = clip_data.Collate(open_clip.get_tokenizer(MODEL))([data[i] for i in range(n)])
    return images, tokens


def linear_inputs(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention module (its input is the q/k/v projection's) and every linear layer outside one.

    The attention's out-projection is left out: torch's nn.MultiheadAttention never calls that module,
    so its input could be seen in the swapped models only, and the fp32 reference would lack it.
    """
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    inside = lambda name: any(name.startswith(f"{a}.") for a in attention)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.MultiheadAttention, nn.Linear)) and not inside(name)
    }


@torch.no_grad()
def measure_features(checkpoint: Path, cell: dict, args: argparse.Namespace) -> dict:
    """max |x| entering any linear layer and max |block output| (the residual stream), on the probe batch."""
    torch.set_num_threads(args.threads)
    model = load_model(checkpoint, cell["format"], cell["ls_init"])
    images, tokens = probe_batch(model, args.probe_batch)
    maxima: dict[str, float] = {}

    def hook(name):
        def record(module, inputs):
            maxima[name] = max(maxima.get(name, 0.0), inputs[0].detach().abs().max().item())

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linear_inputs(model).items()]
    with lowbit.FeatureProbe(model) as probe:
        model(images, tokens)
        residual = probe.max_abs
    for h in handles:
        h.remove()
    top = max(maxima, key=maxima.get)
    return {
        "max_linear_input": maxima[top],
        "max_linear_input_layer": top,
        "max_residual": max(residual.values()),
        "max_residual_block": max(residual, key=residual.get),
    }


class ContrastiveLoss(nn.Module):
    """CLIP plus its loss, so coverage's backward carries the training loss's gradient."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.loss = open_clip.ClipLoss()

    def forward(self, images, tokens):
        return self.loss(*self.clip(images, tokens))


def layer_sqnr(checkpoint: Path, formats: list[str], args: argparse.Namespace) -> dict:
    """{format: {layer: (forward dB, grad-input dB)}}: a copy of the fp32 model swapped to each format."""
    torch.set_num_threads(args.threads)
    reference = load_model(checkpoint, "fp32", ls_init=False)
    images, tokens = probe_batch(reference, args.probe_batch)
    result = {}
    for fmt in formats:
        model = lowbit.swap(copy.deepcopy(reference), fmt, filter_fn=lowbit.ALL)
        report = lowbit.coverage(ContrastiveLoss(model), images, tokens, backward=True).to_dict()
        result[fmt] = {
            row["name"].removeprefix("clip."): (row["sqnr_db"], row["grad_sqnr_db"])
            for row in report["layers"]
            if row["sqnr_db"] is not None
        }
    return result


# -- tables ----------------------------------------------------------------------------------------------


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """'m ± s' (sample std) over seeds, or the single value."""
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def results_table(records: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["format"], r["ls_init"], r["optimizer"]), []).append(r)
    # fp32 runs by (layer-scale, optimizer, seed): a seed fixes the init and the batches, so the paired
    # difference to fp32 removes the part of the seed-to-seed spread that both runs share.
    fp32 = {(r["ls_init"], r["optimizer"], r["seed"]): r for r in records if r["format"] == "fp32"}
    lines = [
        "| format | layer-scale | optimizer | seeds | zero-shot top-1 (%) | per seed | Δ top-1 vs fp32, same seed "
        "(points) | final loss (last-10 mean) | Δ loss vs fp32, same seed | RMS / loss spikes per run "
        "| non-finite runs | max \\|linear input\\| | max \\|residual\\| | train s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (fmt, ls, opt), rs in groups.items():
        col = lambda key, digits, scale=1.0, rs=rs: mean_std([r[key] for r in rs], scale, digits)
        pairs = [(r, fp32[ls, opt, r["seed"]]) for r in rs if fmt != "fp32" and (ls, opt, r["seed"]) in fp32]
        paired = lambda key, digits, scale=1.0, pairs=pairs: (
            mean_std([r[key] - ref[key] for r, ref in pairs], scale, digits) if pairs else "-"
        )
        row = [
            fmt,
            "zero-init" if ls else "none",
            "StableAdamW" if opt == "stableadamw" else "AdamW",
            ",".join(str(r["seed"]) for r in rs),
            col("zero_shot_top1", 1, 100),
            " / ".join(f"{100 * r['zero_shot_top1']:.1f}" for r in rs),
            paired("zero_shot_top1", 1, 100),
            col("final_loss", 3),
            paired("final_loss", 3),
            f"{statistics.mean(r['rms_spikes'] for r in rs):.1f} / {statistics.mean(r['loss_spikes'] for r in rs):.1f}",
            str(sum(r["nonfinite"] > 0 for r in rs)),
            col("max_linear_input", 2),
            col("max_residual", 2),
            f"{statistics.mean(r['train_time_s'] for r in rs):.0f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def short(layer: str) -> str:
    return layer.replace("visual.transformer.resblocks.", "visual.").replace("transformer.resblocks.", "text.")


def sqnr_table(sqnr: dict) -> str:
    formats = list(sqnr)
    layers = list(dict.fromkeys(name for fmt in formats for name in sqnr[fmt]))

    def db(v):
        return "-" if v is None else f"{v:.1f}"

    lines = ["| layer | " + " | ".join(formats) + " |", "|---|" + "---|" * len(formats)]
    for layer in layers:
        row = [" / ".join(db(v) for v in sqnr[fmt].get(layer, (None, None))) for fmt in formats]
        lines.append(f"| {short(layer)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(args: argparse.Namespace, records: list[dict], sqnr: dict | None, sqnr_source: str | None) -> str:
    parts = [
        f"Settings: `{MODEL}`, synthetic data, {args.steps} steps of {args.batch_size} pairs, warmup "
        f"{args.warmup}, threads {args.threads}, train_clip defaults otherwise"
        + (f" plus `{args.train_args}`" if args.train_args else "")
        + f". Seeds {','.join(map(str, args.seeds))} for StableAdamW without layer-scale, "
        f"{','.join(map(str, args.other_seeds))} for the other cells. Mean ± sample std over seeds.",
        "",
        results_table(records),
    ]
    if sqnr:
        parts += [
            "",
            f"Per-layer SQNR (dB, forward / grad-input, vs the fp64 matmul) of the trained {sqnr_source} model "
            f"swapped to each format, on {args.probe_batch} held-out pairs, backward of the contrastive loss:",
            "",
            sqnr_table(sqnr),
        ]
    return "\n".join(parts) + "\n"


# -- the study folder ------------------------------------------------------------------------------------


def prepare_out(args: argparse.Namespace) -> None:
    """A new study, or --resume of one with the same settings, or --overwrite; refuses anything else."""
    out, config_path = args.out, args.out / "study_config.json"
    config = {key: getattr(args, key) for key in FIXED}
    held = [p.name for p in (out / name for name in (*STUDY_FILES, "runs")) if p.exists()]
    if held and args.overwrite:
        for name in held:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif held and not args.resume:
        raise StudyError(
            f"--out {out} already holds a study ({', '.join(held)}): continue it with --resume, "
            "replace it with --overwrite, or choose another --out"
        )
    elif held:
        old = json.loads(config_path.read_text()) if config_path.exists() else {}
        changed = [k for k in FIXED if old.get(k) != config[k]]
        if changed:
            raise StudyError(f"--resume: settings differ from the study in {out}: {', '.join(changed)}")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, json.dumps(config, indent=1) + "\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    prepare_out(args)
    grid = cells(args)
    records = []
    for i, cell in enumerate(grid, 1):
        t0 = time.perf_counter()
        done = (args.out / "runs" / cell["name"] / "summary.json").exists()
        records.append(run_cell(cell, args, args.out / "runs"))
        r = records[-1]
        print(
            f"[{i}/{len(grid)}] {cell['name']}: {'finished before, ' if done else ''}zero-shot top-1 "
            f"{r['zero_shot_top1']:.3f}, loss {r['final_loss']:.3f}, {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    # Per-layer SQNR on the fp32 reference model: the first seed's StableAdamW, no-layer-scale run.
    sqnr = source = None
    low = [f for f in args.formats if f in train_clip.LOWBIT_LAYERS]
    if "fp32" in args.formats and low:
        source = f"fp32-nols-stableadamw-s{args.seeds[0]}"
        sqnr = layer_sqnr(args.out / "runs" / source / "checkpoint.pt", low, args)
    text = report(args, records, sqnr, source)
    study = {"config": {k: getattr(args, k) for k in FIXED}, "runs": records, "sqnr": sqnr, "sqnr_model": source}
    atomic_write_text(args.out / "study.json", json.dumps(study, indent=1) + "\n")
    atomic_write_text(args.out / "study.md", text)
    print(text)
    return study


def cli(argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except StudyError as err:
        print(f"formats_study.py: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
