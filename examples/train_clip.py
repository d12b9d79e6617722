"""Train an open_clip CLIP model with lowbit: int8 / fp8 linear layers, StableAdamW, SpikeMonitor.

After Wortsman, Dettmers et al., "Stable and low-precision training for large-scale vision-language
models" (2023). From a laptop CPU (the built-in `lowbit-tiny` model on the built-in synthetic data,
300 steps in a few minutes):

    python examples/train_clip.py --model lowbit-tiny --train-data synthetic \
        --precision switchback --optimizer stableadamw --steps 300 --out runs/tiny-switchback

to a GPU node (open_clip's CSV conventions; webdataset shards work the same way, "shards/{000..099}.tar"):

    torchrun --nproc_per_node 8 examples/train_clip.py --model ViT-B-32 --train-data train.tsv \
        --csv-img-key filepath --csv-caption-key title --zeroshot-dir imagenet/val \
        --precision switchback --optimizer stableadamw --batch-size 256 --steps 20000 --warmup 2000 \
        --lr 2e-3 --wd 0.2 --beta2 0.98 --ls-init --out runs/b32-switchback

Precisions: fp32 | bf16 (torch.autocast) | switchback, switchback-row, switchback-memeff (lowbit's
SwitchBackLinear) | fp8-tensorwise, fp8-switchback (lowbit's Float8Linear, simulated without an fp8
GPU) | llm-int8 (the paper's baseline, int8 in all three matmuls: examples/llm_int8.py). Low-bit
precisions replace every nn.Linear and nn.MultiheadAttention that `lowbit.swap`'s default filter
accepts (layers >= 512 wide); when it accepts none (small models such as lowbit-tiny) or with
--swap-all, every one. With --amp auto they run the rest of the model in bf16 on CUDA (the paper's
setting) and in fp32 on the CPU.

`--out DIR` receives summary.json (zero_shot_top1, final_loss, samples/s, spike events, ...),
log.jsonl (one line per step), monitor.jsonl (SpikeMonitor), tb/ (TensorBoard, if installed),
loss.png and spikes.png (if matplotlib is installed) and checkpoint.pt, written atomically every
--save-every steps; `--resume auto` (or a path) continues a run exactly where the checkpoint left it.
A folder that already holds a run is never overwritten unless --overwrite is given.

Every flag, path and input is checked before the first step; a mistake ends the program with one
line on stderr and exit status 2, an interrupt (Ctrl-C) with the command that resumes, status 130.
Zero-shot accuracy is measured on --zeroshot-dir, or on the synthetic classes when training on the
synthetic data; on other data without --zeroshot-dir it is skipped (and the summary says so).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import clip_data  # the helper modules beside this file (the script's folder is first on sys.path)
import clip_eval
import numpy as np
import open_clip
import torch
import torch.distributed as dist
from llm_int8 import LLMInt8Linear
from torch import nn

import lowbit
from lowbit.swap import default_filter

open_clip.add_model_config(Path(__file__).resolve().parent / "model_configs")  # registers lowbit-tiny
# open_clip's ClipLoss gathers features with torch.distributed.nn.all_gather, which warns on every step.
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)

PRECISIONS = (
    "fp32",
    "bf16",
    "switchback",
    "switchback-row",
    "switchback-memeff",
    "fp8-tensorwise",
    "fp8-switchback",
    "llm-int8",
)
LOWBIT_LAYERS = {
    "switchback": "switchback",
    "switchback-row": "switchback-row",
    "switchback-memeff": "switchback-memeff",
    "fp8-tensorwise": "fp8-tensorwise",
    "fp8-switchback": "fp8-switchback",
    "llm-int8": LLMInt8Linear,
}
# Flags that change what a run computes: a resume must keep the checkpoint's, or it is no longer exact.
# lr, wd, betas and eps would not even apply (the checkpoint's optimizer and scheduler state replace
# them); --steps sets the cosine schedule's length. Output, logging, evaluation, checkpointing and
# device flags may change.
RESUME_FIXED = (
    *("model", "precision", "swap_all", "amp", "ls_init"),
    *("optimizer", "lr", "wd", "beta1", "beta2", "eps", "warmup", "batch_size", "steps", "grad_clip", "seed"),
    *("train_data", "dataset_type", "csv_separator", "csv_img_key", "csv_caption_key"),
    *("synthetic_size", "data_seed", "augment", "monitor_action"),
)
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "config", "step", "world_size", "rng", "log", "events", "stats")
# What a run writes into --out; --overwrite removes exactly these (and checkpoint-<step>.pt, tb/).
RUN_FILES = ("checkpoint.pt", "log.jsonl", "monitor.jsonl", "summary.json", "loss.png", "spikes.png")


class StopRun(Exception):
    """Ends the program with this one line on stderr (no traceback) and exit status `code`."""

    code = 1


class UsageError(StopRun, ValueError):
    """A flag, path or input that cannot work, found before the first step."""

    code = 2


class Interrupted(StopRun):
    """Ctrl-C: says where the last checkpoint is and how to resume."""

    code = 130


# -- flags -------------------------------------------------------------------------------------------


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's real default; on/off switches say what they do instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default in (None, argparse.SUPPRESS)
            or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            or "%(default)" in text
        ):
            return text
        default = repr(action.default) if isinstance(action.default, str) else str(action.default)
        return f"{text} (default: {default.replace('%', '%%')})".lstrip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("model and precision")
    g.add_argument(
        "--model", default="lowbit-tiny", help="an open_clip model name (random init, no download) or lowbit-tiny"
    )
    g.add_argument("--precision", default="fp32", choices=PRECISIONS, help="how the linear layers compute")
    g.add_argument(
        "--swap-all",
        action="store_true",
        help="swap every linear layer (without it: those >= 512 wide, or all if none is)",
    )
    g.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "bf16", "off"),
        help="bf16 autocast: auto = for --precision bf16, and around low-bit layers on CUDA",
    )
    g.add_argument("--ls-init", action="store_true", help="zero-init layer-scale in every residual branch")
    g = p.add_argument_group("optimization")
    g.add_argument(
        "--optimizer", default="stableadamw", choices=("adamw", "stableadamw"), help="lowbit's StableAdamW or AdamW"
    )
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    g.add_argument("--wd", type=float, default=0.1, help="decoupled weight decay (not on gains, biases, logit_scale)")
    g.add_argument("--beta1", type=float, default=0.9, help="Adam's first-moment decay")
    g.add_argument("--beta2", type=float, default=0.98, help="Adam's second-moment decay")
    g.add_argument("--eps", type=float, default=1e-6, help="Adam's epsilon")
    g.add_argument("--warmup", type=int, default=30, help="linear warmup steps, then cosine decay to 0")
    g.add_argument("--batch-size", type=int, default=128, help="per process")
    g.add_argument("--steps", type=int, default=300, help="optimizer steps (the cosine schedule's length)")
    g.add_argument("--grad-clip", type=float, default=0.0, help="max global gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="model initialization and data order")
    g = p.add_argument_group("data")
    g.add_argument("--train-data", default="synthetic", help="CSV/TSV file, .tar shards, or 'synthetic'")
    g.add_argument(
        "--dataset-type", default="auto", choices=("auto", "csv", "webdataset", "synthetic"), help="auto: from the name"
    )
    g.add_argument("--csv-separator", default="\t", help="the CSV's column separator")
    g.add_argument("--csv-img-key", default="filepath", help="the column of image paths")
    g.add_argument("--csv-caption-key", default="title", help="the column of captions")
    g.add_argument("--val-data", help="held-out pairs for retrieval (same format as --train-data)")
    g.add_argument("--val-size", type=int, default=500, help="held-out pairs used for retrieval")
    g.add_argument("--synthetic-size", type=int, default=50_000, help="training samples of the synthetic set")
    g.add_argument("--data-seed", type=int, default=0, help="what the synthetic data looks like (not its order)")
    g.add_argument(
        "--augment",
        action="store_true",
        help="open_clip's training augmentation for image files (exact resume needs --workers 0)",
    )
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--zeroshot-dir",
        help="ImageFolder: one folder per class, '_' read as ' ' (without it: the synthetic classes when "
        "training on the synthetic data, else no zero-shot evaluation)",
    )
    g.add_argument(
        "--zeroshot-templates",
        default=";".join(clip_eval.DEFAULT_TEMPLATES),
        help="';'-separated prompt templates, '{}' is the class name; match them to how your captions read",
    )
    g.add_argument("--zeroshot-samples", type=int, default=600, help="synthetic zero-shot images (20 per class)")
    g.add_argument("--eval-every", type=int, default=0, help="also evaluate every this many steps (0: at the end)")
    g.add_argument("--eval-batch-size", type=int, default=250, help="images per evaluation batch")
    g = p.add_argument_group("monitoring, output and checkpoints")
    g.add_argument("--out", default="runs/clip", help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out (refused without it)")
    g.add_argument("--no-monitor", dest="monitor", action="store_false", help="turn the SpikeMonitor off (it is on)")
    g.add_argument(
        "--monitor-action", default="log", choices=("log", "skip", "rollback"), help="what a loss spike triggers"
    )
    g.add_argument("--log-every", type=int, default=10, help="print / progress-bar interval")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="plain prints instead of a tqdm bar")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no tb/ event files")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="no loss.png / spikes.png")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every this many steps (0: only at the end)")
    g.add_argument("--keep-checkpoints", action="store_true", help="also keep checkpoint-<step>.pt files")
    g.add_argument("--resume", help="a checkpoint, or 'auto' for OUT/checkpoint.pt if it exists")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if torch sees it")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Counts, ranges and flag combinations; raises UsageError naming the flag."""
    at_least = {
        **dict.fromkeys(("steps", "batch_size", "log_every", "eval_batch_size", "val_size"), 1),
        **dict.fromkeys(("synthetic_size", "zeroshot_samples"), 1),
        **dict.fromkeys(("warmup", "save_every", "eval_every", "workers", "threads", "grad_clip", "wd"), 0),
    }
    for name, low in at_least.items():
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("lr", "eps"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name} must be > 0, got {getattr(args, name)}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise UsageError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.resume is not None and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here; use --device cpu")
    zeroshot_templates(args)


def zeroshot_templates(args: argparse.Namespace) -> list[str]:
    """The --zeroshot-templates list; raises UsageError for one without exactly one '{}'."""
    templates = [t for t in args.zeroshot_templates.split(";") if t.strip()]
    if not templates:
        raise UsageError("--zeroshot-templates is empty: give ';'-separated templates such as 'a photo of a {}.'")
    for t in templates:
        try:
            ok = t.count("{}") == 1 and bool(t.format("x"))
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise UsageError(f"--zeroshot-templates: {t!r} needs exactly one '{{}}' (the class name), no other braces")
    return templates


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def create_model(name: str, *, ls_init: bool) -> nn.Module:
    """An open_clip model from its config, randomly initialized (no download)."""
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"--model {name!r} is not an open_clip model config; see open_clip.list_models()")
    kwargs = {}
    if ls_init:
        # open_clip builds a LayerScale in every residual branch when ls_init_value is set; 0 is the
        # paper's zero-init (section 3.3), which lowbit.zero_init_layer_scale applies below.
        kwargs = {tower: {**config[tower], "ls_init_value": 1.0} for tower in ("vision_cfg", "text_cfg")}
    model = open_clip.create_model(name, pretrained=None, **kwargs)
    if ls_init:
        lowbit.zero_init_layer_scale(model)
    return model


def swap_filter(model: nn.Module, swap_all: bool):
    """lowbit's default filter, or every layer if asked or if the default would swap none."""
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))]
    if swap_all or not any(default_filter(m, n) for n, m in candidates):
        return lambda module, name: True
    return None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, logit_scale and other < 2-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def warmup_cosine(step: int, *, warmup: int, steps: int) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Transform:
    """open_clip's image transform, plus what the synthetic set needs to render at the same size."""

    def __init__(self, model: nn.Module, *, train: bool) -> None:
        cfg = model.visual.preprocess_cfg
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.synthetic = (size, cfg["mean"], cfg["std"])
        self._transform = open_clip.image_transform(size, is_train=train, mean=cfg["mean"], std=cfg["std"])

    def __call__(self, image):
        return self._transform(image)


def rng_state() -> dict:
    """torch / CUDA / numpy / Python RNG states as tensors and plain types (loadable with weights_only)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))


# -- the run folder and its files ----------------------------------------------------------------------


def atomic_write(path: Path, write) -> None:
    """Calls write(tmp) for a temporary file beside `path`, fsyncs it and renames it over `path`.

    A kill leaves either the old file or the new one (a leftover `.NAME.tmp<pid>` is removed by the
    next start, see `remove_leftover_tmp`). A failed write removes its temporary file, keeps the old
    file, and says "no space left" when that is why (torch.save reports a full disk as a RuntimeError
    from its zip writer, without errno, so the free space is asked).
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        free = shutil.disk_usage(path.parent).free  # before the temporary file's space is given back
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):
            full = getattr(err, "errno", None) == errno.ENOSPC or free <= max(written, 1 << 20)
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            cause = f"no space left on the device ({free / 2**20:.0f} MiB free)" if full else first_line
            kept = f"{path.name} keeps its last good version" if path.exists() else f"no {path.name} was written"
            raise StopRun(f"could not write {path}: {cause}; {kept}") from err
        raise


def atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def run_files(out: Path) -> list[Path]:
    """The files of a run in `out` (what --overwrite removes)."""
    if not out.is_dir():
        return []
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    found += sorted(out.glob("checkpoint-*.pt"))
    return found + ([out / "tb"] if (out / "tb").is_dir() else [])


def remove_leftover_tmp(out: Path) -> list[str]:
    """Removes temporary files of writes that a kill interrupted (`.NAME.tmp<pid>`); returns their names."""
    names = []
    for p in sorted(out.glob(".*.tmp*")):
        target = p.name[1:].rpartition(".tmp")[0]
        if p.is_file() and (target in RUN_FILES or target.startswith("checkpoint-")):
            p.unlink()
            names.append(p.name)
    return names


def check_out(args: argparse.Namespace) -> Path | None:
    """Checks --out and --resume before anything is written; returns the checkpoint to resume or None.

    A folder that holds a run is refused unless --resume continues it or --overwrite replaces it.
    """
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    existing = run_files(out)
    resume = None
    if args.resume == "auto":
        if (out / "checkpoint.pt").exists():
            resume = out / "checkpoint.pt"
        elif existing:
            others = ", ".join(p.name for p in existing)
            raise UsageError(
                f"--resume auto: {out} holds a run ({others}) but no checkpoint.pt; "
                + (
                    f"resume one with --resume {existing_checkpoints(out)[0]}"
                    if existing_checkpoints(out)
                    else "pass --overwrite to start it anew"
                )
            )
    elif args.resume is not None:
        resume = Path(args.resume)
        if not resume.is_file():
            raise UsageError(f"--resume {resume}: no such file{checkpoint_hint(resume)}")
    elif existing and not args.overwrite:
        raise UsageError(
            f"--out {out} already holds a run ({', '.join(p.name for p in existing[:4])}"
            f"{', ...' if len(existing) > 4 else ''}): continue it with --resume auto, replace it with "
            "--overwrite, or choose another --out"
        )
    probe = existing_parent(out)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {probe} is not writable")
    return resume


def existing_checkpoints(folder: Path, *, but: Path | None = None) -> list[Path]:
    """checkpoint.pt and checkpoint-<step>.pt in `folder`, newest step first."""
    found = sorted(folder.glob("checkpoint-*.pt"), reverse=True)
    if (folder / "checkpoint.pt").exists():
        found.insert(0, folder / "checkpoint.pt")
    return [p for p in found if but is None or p.resolve() != but.resolve()]


def checkpoint_hint(path: Path) -> str:
    others = existing_checkpoints(path.parent, but=path)
    if not others:
        return f" (and no other checkpoint in {path.parent})"
    return "; other checkpoints to try: " + ", ".join(f"--resume {p}" for p in others[:5])


def load_checkpoint(path: Path) -> dict:
    """A train_clip checkpoint, loaded with weights_only (never unpickled); UsageError naming the file and
    what is wrong with it (empty, truncated, not a checkpoint, unreadable) and the others to try."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format
    problem = None
    if size == 0:
        problem = "is empty (0 bytes; a save interrupted before it wrote anything)"
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - every way a file can fail to load is reported the same way
            if not is_zip:
                problem = f"is not a torch checkpoint (unreadable as one: {type(err).__name__})"
            elif "weights only" in str(err).lower():
                problem = "holds objects other than tensors and plain types: not a train_clip checkpoint"
            else:
                problem = f"is truncated or damaged ({size} bytes; cut short by a kill or a full disk during a save?)"
        else:
            missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
            if missing:
                problem = f"is not a train_clip checkpoint (no {', '.join(repr(k) for k in missing[:3])})"
    if problem:
        raise UsageError(f"--resume {path} {problem}{checkpoint_hint(path)}")
    return ckpt


def check_resume_config(ckpt: dict, args: argparse.Namespace, world_size: int, path: Path) -> None:
    fixed = list(RESUME_FIXED)
    if args.monitor_action != "log":  # a monitor that skips or rolls back steps changes the run
        fixed.append("monitor")
    config = ckpt["config"]
    changed = [key for key in fixed if config.get(key) != getattr(args, key)]
    if changed:
        raise UsageError(
            f"--resume {path}: an exact resume needs the checkpoint's settings; changed: "
            + ", ".join(f"{key} {config.get(key)!r} -> {getattr(args, key)!r}" for key in changed)
        )
    if ckpt["world_size"] != world_size:
        raise UsageError(f"--resume {path}: saved by {ckpt['world_size']} processes, resumed by {world_size}")
    if args.monitor and ckpt.get("monitor") is None:
        raise UsageError(f"--resume {path}: the checkpoint has no SpikeMonitor state; resume with --no-monitor")


def existing_parent(path: Path) -> Path:
    """`path`, or its nearest folder that exists (where it would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(out: Path, model: nn.Module) -> None:
    """Room for one more checkpoint (model + two Adam moments, fp32) beside the last one."""
    need = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) + (8 << 20)
    free = shutil.disk_usage(existing_parent(out)).free
    if free < need:
        raise UsageError(
            f"--out {out}: {free / 2**20:.0f} MiB free, a checkpoint needs about {need / 2**20:.0f} MiB; "
            "free some space or choose another --out"
        )


def prepare_out(out: Path, args: argparse.Namespace, say) -> None:
    """Creates --out; with --overwrite removes the old run's files; removes leftover temporary files."""
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        old = run_files(out)
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if old:
            say(f"--overwrite: removed the previous run's {', '.join(p.name for p in old)}")
    leftovers = remove_leftover_tmp(out)
    if leftovers:
        say(f"removed {len(leftovers)} temporary file(s) of an interrupted save: {', '.join(leftovers)}")


def plot_curves(path: Path, log: list[dict], title: str) -> None:
    """loss (raw and smoothed) and learning rate against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    loss = np.array([r["loss"] for r in log])
    smooth = np.convolve(loss, np.ones(10) / 10, mode="valid") if len(loss) >= 10 else loss
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 1))
    ax_loss.plot(steps, loss, alpha=0.35, label="loss")
    ax_loss.plot(steps[len(steps) - len(smooth) :], smooth, label="loss (10-step mean)")
    ax_loss.set_ylabel("contrastive loss")
    ax_loss.legend()
    ax_loss.set_title(title)
    ax_lr.plot(steps, [r["lr"] for r in log])
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# -- data and evaluation sets --------------------------------------------------------------------------


def build_train_set(spec: str, kind: str, *, transform, args, split: str = "train", size: int | None = None):
    """The dataset behind --train-data / --val-data; UsageError for a missing or malformed one."""
    if kind == "auto":
        kind = "synthetic" if spec == "synthetic" else "webdataset" if ".tar" in spec else "csv"
    try:
        if kind == "synthetic":
            image_size, mean, std = transform.synthetic
            return clip_data.SyntheticShapes(
                size or args.synthetic_size, image_size, split=split, seed=args.data_seed, mean=mean, std=std
            )
        if kind == "webdataset":
            return clip_data.TarShardDataset(spec, transform)
        return clip_data.CsvDataset(
            spec, transform, img_key=args.csv_img_key, caption_key=args.csv_caption_key, sep=args.csv_separator
        )
    except (OSError, ValueError) as err:  # missing files, missing columns, no rows, unreadable tars
        raise UsageError(str(err)) from err


@dataclass
class ZeroShot:
    """The zero-shot set, what to call it and its prompt templates."""

    dataset: torch.utils.data.Dataset
    name: str
    templates: list[str]
    default_templates: bool
    heldout: list[int] | None = None


def build_zero_shot(args, transform, train_is_synthetic: bool, say) -> ZeroShot | None:
    """--zeroshot-dir, else the synthetic classes when training on them, else None (skipped, said so)."""
    templates = zeroshot_templates(args)
    default = args.zeroshot_templates == ";".join(clip_eval.DEFAULT_TEMPLATES)
    if args.zeroshot_dir:
        try:
            dataset = clip_data.ImageFolderClasses(args.zeroshot_dir, transform)
        except (OSError, ValueError) as err:
            raise UsageError(str(err)) from err
        zs = ZeroShot(dataset, args.zeroshot_dir, templates, default)
    elif train_is_synthetic:
        size, mean, std = transform.synthetic
        dataset = clip_data.SyntheticShapes(
            args.zeroshot_samples, size, split="zeroshot", seed=args.data_seed, mean=mean, std=std
        )
        zs = ZeroShot(dataset, "synthetic shapes", templates, default, heldout=dataset.heldout)
    else:
        say(
            "zero-shot: skipped (no --zeroshot-dir; the built-in synthetic classes are not those of "
            f"{args.train_data}); pass --zeroshot-dir with one folder per class to measure it"
        )
        return None
    say(
        f"zero-shot: {len(zs.dataset.classnames)} classes, {len(zs.dataset)} images from {zs.name}; "
        f"templates {templates}"
        + (
            " (the default photo templates: if your captions read otherwise, pass your own, "
            "e.g. --zeroshot-templates 'a handwritten digit {}.;a digit {}.')"
            if default and args.zeroshot_dir
            else ""
        )
    )
    return zs


def check_batch_size(args, train_set, world_size: int) -> None:
    batch = args.batch_size * world_size
    if batch > len(train_set):
        raise UsageError(
            f"--batch-size {args.batch_size}{f' x {world_size} processes' if world_size > 1 else ''} is larger "
            f"than the training set ({len(train_set)} pairs): each batch would repeat pairs, and the contrastive "
            f"loss would count the copies as negatives; use --batch-size {max(1, len(train_set) // world_size)} "
            "or less"
        )


def evaluate(run: Run, step: int) -> dict:
    """Zero-shot top-1 (if there is a zero-shot set) and retrieval R@1 (rank 0, on the unwrapped model)."""
    result: dict = {"step": step}
    zs = run.zero_shot
    if zs is None:
        result.update(zero_shot_top1=None, zero_shot_set=None, zero_shot_skipped="no --zeroshot-dir")
    else:
        loader = torch.utils.data.DataLoader(
            zs.dataset, batch_size=run.args.eval_batch_size, collate_fn=clip_data.collate_eval,
            num_workers=run.args.workers,
        )  # fmt: skip
        preds, labels, dropped = clip_eval.zero_shot_predictions(
            run.model, run.tokenizer, zs.dataset.classnames, loader,
            templates=zs.templates, device=run.device, autocast=run.autocast,
        )  # fmt: skip
        result.update(
            zero_shot_top1=clip_eval.accuracy(preds, labels),
            zero_shot_set=zs.name,
            zero_shot_templates=zs.templates,
            zero_shot_images=len(labels),
            zero_shot_classes=len(zs.dataset.classnames),
            zero_shot_unreadable=dropped,
        )
        if zs.heldout is not None:
            seen = [k for k in range(len(zs.dataset.classnames)) if k not in zs.heldout]
            result["zero_shot_top1_seen_classes"] = clip_eval.accuracy(preds, labels, seen)
            result["zero_shot_top1_heldout_classes"] = clip_eval.accuracy(preds, labels, zs.heldout)
    if run.val_set is not None:
        loader = torch.utils.data.DataLoader(run.val_set, batch_size=run.args.eval_batch_size, collate_fn=run.collate)
        result["retrieval"] = clip_eval.retrieval_recall_at_1(
            run.model, loader, device=run.device, autocast=run.autocast
        )
    return result


# -- the run -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the training loop, the evaluation and the checkpoints share."""

    args: argparse.Namespace
    argv: list[str]
    out: Path
    rank: int
    world_size: int
    device: torch.device
    use_cuda: bool
    is_main: bool
    model: nn.Module | None = None
    bf16: bool = False
    autocast: object = None
    tokenizer: object = None
    collate: object = None
    train_set: object = None
    val_set: object = None
    zero_shot: ZeroShot | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    monitor: lowbit.SpikeMonitor | None = None
    tb_writer: object = None
    log_file: object = None
    start_step: int = 0
    log: list = field(default_factory=list)
    events: list = field(default_factory=list)
    stats: dict = field(default_factory=lambda: {"skipped_images": 0, "train_time": 0.0})
    evals: list = field(default_factory=list)
    last_save: int = 0
    last_checkpoint: Path | None = None
    t_start: float = field(default_factory=time.time)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def say(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)


def setup(args: argparse.Namespace, argv: list[str]) -> tuple[Run, dict | None]:
    """Checks every flag, path and input and builds the model and the data sets; writes nothing into
    --out (all checks come first). Returns the run and the checkpoint to resume from."""
    check_args(args)
    resume = check_out(args)
    ckpt = load_checkpoint(resume) if resume is not None else None
    # Processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; gloo on the CPU, nccl on GPUs.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    run = Run(args, argv, Path(args.out), rank, world_size, device, use_cuda, is_main=rank == 0)
    if ckpt is not None:
        check_resume_config(ckpt, args, world_size, resume)
        run.last_save = run.start_step = ckpt["step"]
        run.last_checkpoint = resume

    # Model: the same initialization on every rank (DDP also broadcasts rank 0's at wrapping).
    seed_everything(args.seed)
    try:
        run.model = model = create_model(args.model, ls_init=args.ls_init)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.precision in LOWBIT_LAYERS:
        filter_fn = swap_filter(model, args.swap_all)
        lowbit.swap(model, LOWBIT_LAYERS[args.precision], filter_fn=filter_fn)
        swapped = sum(isinstance(m, lowbit.nn.LowbitLinear) for m in model.modules())
        which = "all" if filter_fn else "lowbit default filter"
        run.say(f"{args.precision}: {swapped} linear layers swapped ({which})")

    # Data: this rank's slice of each global batch, a pure function of (seed, step); the evaluation sets.
    run.tokenizer = open_clip.get_tokenizer(args.model)
    run.collate = clip_data.Collate(run.tokenizer)
    run.train_set = build_train_set(
        args.train_data, args.dataset_type, args=args, transform=Transform(model, train=args.augment)
    )
    check_batch_size(args, run.train_set, world_size)
    eval_transform = Transform(model, train=False)
    synthetic = isinstance(run.train_set, clip_data.SyntheticShapes)
    run.zero_shot = build_zero_shot(args, eval_transform, synthetic, run.say)
    if args.val_data or synthetic:
        val_set = build_train_set(
            args.val_data or "synthetic", "auto" if args.val_data else "synthetic",
            args=args, transform=eval_transform, split="val", size=args.val_size,
        )  # fmt: skip
        run.val_set = torch.utils.data.Subset(val_set, range(min(args.val_size, len(val_set))))
    check_free_space(run.out, model)
    return run, ckpt


def start(run: Run, ckpt: dict | None) -> None:
    """Processes, the run folder, the optimizer; then the resumed state and the logs."""
    args, model = run.args, run.model
    if run.use_cuda:
        torch.cuda.set_device(run.device)
    if run.distributed:
        dist.init_process_group("nccl" if run.use_cuda else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif run.distributed and not run.use_cuda:  # processes share the cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", run.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if run.is_main:
        prepare_out(run.out, args, run.say)
    if run.distributed:
        dist.barrier()
    model.to(run.device)
    run.bf16 = args.amp == "bf16" or (
        args.amp == "auto" and (args.precision == "bf16" or (args.precision in LOWBIT_LAYERS and run.use_cuda))
    )
    run.autocast = functools.partial(torch.autocast, run.device.type, dtype=torch.bfloat16, enabled=run.bf16)
    n_params = sum(p.numel() for p in model.parameters())
    run.say(
        f"{args.model}: {n_params / 1e6:.2f}M parameters on {run.device} x {run.world_size}, "
        f"precision {args.precision}{' + bf16 autocast' if run.bf16 else ''}, optimizer {args.optimizer}"
    )

    # Optimizer and schedule.
    groups = param_groups(model, args.wd)
    betas = (args.beta1, args.beta2)
    if args.optimizer == "stableadamw":
        run.optimizer = lowbit.StableAdamW(groups, lr=args.lr, betas=betas, eps=args.eps)
    else:
        run.optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=betas, eps=args.eps)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, functools.partial(warmup_cosine, warmup=args.warmup, steps=args.steps)
    )

    resume(run, ckpt)
    open_logs(run, ckpt.get("monitor") if ckpt is not None else None)


def resume(run: Run, ckpt: dict | None) -> None:
    """The checkpoint's model, optimizer, schedule, RNGs, data position (the step) and logs."""
    args = run.args
    if ckpt is None:
        if args.resume == "auto":
            run.say(f"--resume auto: no checkpoint in {run.out}; starting a new run")
        seed_everything(args.seed + run.rank)  # per-rank augmentation noise; the model is already built
        return
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"][run.rank])
    run.log, run.events, run.stats = ckpt["log"], ckpt["events"], ckpt["stats"]
    path = run.out / "checkpoint.pt" if args.resume == "auto" else args.resume
    run.say(f"resumed from {path} at step {run.start_step}")


def open_logs(run: Run, monitor_state: dict | None) -> None:
    """TensorBoard, the SpikeMonitor (continuing its state on resume) and log.jsonl."""
    args = run.args
    # Monitoring: every rank judges the same (all-reduced) gradients, so skip / rollback agree;
    # rank 0 writes. A resumed monitor continues its detection windows and appends to monitor.jsonl
    # (dropping lines past the checkpoint); "rollback" then starts from a snapshot of the resumed state.
    if run.is_main and args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides the earlier events at steps >= purge_step: those after the checkpoint,
            # which this run logs again; the checkpoint's own step is logged already and stays.
            purge = run.start_step + 1 if run.start_step else None
            run.tb_writer = SummaryWriter(str(run.out / "tb"), purge_step=purge)
        except ImportError:
            run.say("tensorboard not installed: logging to log.jsonl only")
    if args.monitor:
        run.monitor = lowbit.SpikeMonitor(
            run.model,
            run.optimizer,
            action=args.monitor_action,
            jsonl=run.out / "monitor.jsonl" if run.is_main else None,
            jsonl_mode="a" if monitor_state is not None else "w",
            tensorboard=run.out / "tb" / "monitor" if run.tb_writer is not None else None,
        )
        if monitor_state is not None:
            run.monitor.load_state_dict(monitor_state)
    if run.is_main:
        # Rewritten from the checkpoint's log on resume, atomically: a kill now must not lose it.
        atomic_write_text("".join(json.dumps(record) + "\n" for record in run.log), run.out / "log.jsonl")
        run.log_file = open(run.out / "log.jsonl", "a")


def train(run: Run) -> None:
    """Steps start_step .. --steps, with evaluations and checkpoints on their schedules."""
    args, model = run.args, run.model
    sampler = clip_data.StepBatchSampler(
        len(run.train_set), args.batch_size, seed=args.seed, steps=args.steps,
        start_step=run.start_step, rank=run.rank, world_size=run.world_size,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        run.train_set, batch_sampler=sampler, collate_fn=run.collate, num_workers=args.workers,
        pin_memory=run.use_cuda,
    )  # fmt: skip
    ddp_model = model
    if run.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if run.use_cuda else None)
    # Features of every rank enter every rank's loss (open_clip's global contrastive batch).
    loss_fn = open_clip.ClipLoss(
        local_loss=False, gather_with_grad=True, cache_labels=True, rank=run.rank, world_size=run.world_size
    )
    progress = None
    if run.is_main and args.progress:
        try:
            from tqdm import tqdm

            progress = tqdm(total=args.steps, initial=run.start_step, desc=args.precision, dynamic_ncols=True)
        except ImportError:
            run.say("tqdm not installed: plain progress lines")
    batches = iter(loader)
    try:
        for step in range(run.start_step, args.steps):
            t0 = time.perf_counter()
            images, tokens, skipped, _ = next(batches)
            images, tokens = images.to(run.device, non_blocking=True), tokens.to(run.device, non_blocking=True)
            with run.autocast():
                image_features, text_features, logit_scale = ddp_model(images, tokens)
                loss = loss_fn(image_features, text_features, logit_scale)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            run.optimizer.step()
            step_events = run.monitor.step(loss) if run.monitor is not None else []
            run.scheduler.step()
            with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilizes training
                model.logit_scale.clamp_(0, math.log(100))
            loss_value = loss.item()
            if run.distributed:
                skipped_t = torch.tensor([skipped], device=run.device)
                dist.all_reduce(skipped_t)
                skipped = int(skipped_t.item())
            dt = time.perf_counter() - t0
            run.stats["train_time"] += dt
            run.stats["skipped_images"] += skipped
            run.events.extend(step_events)
            record = {
                "step": step + 1,
                "loss": loss_value,
                "lr": run.optimizer.param_groups[0]["lr"],
                "logit_scale": model.logit_scale.exp().item(),
                "samples_per_s": args.batch_size * run.world_size / dt,
                "skipped_images": run.stats["skipped_images"],
            }
            run.log.append(record)
            if run.is_main:
                log_step(run, record, step_events, progress)
            if not math.isfinite(loss_value) and args.monitor_action == "log":
                run.say(f"step {step + 1}: the loss is {loss_value}; stopping")
                break
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                if run.is_main:
                    run.evals.append(evaluate(run, step + 1))
                    top1 = run.evals[-1]["zero_shot_top1"]
                    if top1 is not None:
                        run.say(f"step {step + 1}: zero-shot top-1 {top1:.3f} ({run.zero_shot.name})")
                        if run.tb_writer is not None:
                            run.tb_writer.add_scalar("eval/zero_shot_top1", top1, step + 1)
                if run.distributed:
                    dist.barrier()
            if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps:
                save_checkpoint(run, step + 1)
    finally:
        if progress is not None:
            progress.close()


def log_step(run: Run, record: dict, step_events: list[dict], progress) -> None:
    args, step = run.args, record["step"]
    run.log_file.write(json.dumps(record) + "\n")
    run.log_file.flush()
    if run.tb_writer is not None:
        for key in ("loss", "lr", "logit_scale", "samples_per_s"):
            run.tb_writer.add_scalar(f"train/{key}", record[key], step)
    for e in step_events:
        if e["kind"] != "rms_spike":
            run.say(f"step {step}: {e['kind']} (loss {e['value']}, threshold {e['threshold']})")
    due = step % args.log_every == 0 or step == args.steps
    if progress is not None:
        progress.update(1)
        if due:
            progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
    elif due:
        run.say(
            f"step {step}/{args.steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"{record['samples_per_s']:.0f} samples/s"
        )


def save_checkpoint(run: Run, step: int) -> None:
    """checkpoint.pt (and checkpoint-<step>.pt with --keep-checkpoints), written atomically by rank 0."""
    rngs = [rng_state()]
    if run.distributed:  # every rank's RNGs, so each resumes its own stream
        rngs = [None] * run.world_size
        dist.all_gather_object(rngs, rng_state())
    if run.is_main:
        checkpoint = {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "config": vars(run.args),
            "step": step,
            "world_size": run.world_size,
            "rng": rngs,
            "data_position": {"step": step},
            "log": run.log,
            "events": run.events,
            "stats": run.stats,
            "monitor": run.monitor.state_dict() if run.monitor is not None else None,
        }
        if run.monitor is not None:
            # A resume truncates monitor.jsonl back to the checkpoint's step, so the log must be on
            # disk before the checkpoint is.
            run.monitor.sync()
        atomic_save(checkpoint, run.out / "checkpoint.pt")
        if run.args.keep_checkpoints:
            atomic_save(checkpoint, run.out / f"checkpoint-{step:06d}.pt")
    run.last_save, run.last_checkpoint = step, run.out / "checkpoint.pt"


def interrupt_message(run: Run) -> str:
    steps_done = run.log[-1]["step"] if run.log else run.start_step
    if run.last_checkpoint is None:
        return (
            f"interrupted at step {steps_done}, before the first checkpoint (--save-every {run.args.save_every}): "
            "nothing to resume; start again with --overwrite"
        )
    argv = [a for a in run.argv if a != "--overwrite" and not a.startswith("--resume=")]
    if "--resume" in argv:
        i = argv.index("--resume")
        del argv[i : i + 2]
    auto = run.last_checkpoint == run.out / "checkpoint.pt"
    script = Path(__file__).resolve()
    if sys.argv[0] and Path(sys.argv[0]).resolve() == script:
        script = sys.argv[0]  # as the user typed it
    launcher = ["torchrun", f"--nproc_per_node={run.world_size}"] if run.distributed else [sys.executable]
    command = shlex.join([*launcher, str(script), *argv, "--resume", "auto" if auto else str(run.last_checkpoint)])
    return (
        f"interrupted at step {steps_done}; the last checkpoint is {run.last_checkpoint} (step {run.last_save}); "
        f"resume with: {command}"
    )


def finish(run: Run) -> dict | None:
    """The final evaluation, summary.json, the plots and the last line (rank 0); closes everything."""
    args, log = run.args, run.log
    steps_done = log[-1]["step"] if log else 0
    losses = [r["loss"] for r in log]
    summary = None
    if run.is_main:
        t_eval = time.perf_counter()
        final = evaluate(run, steps_done)
        eval_s = time.perf_counter() - t_eval
        summary = {
            "zero_shot_top1": final["zero_shot_top1"],
            **{k: v for k, v in final.items() if k.startswith("zero_shot_") and k != "zero_shot_top1"},
            "retrieval": final.get("retrieval"),
            "final_loss": losses[-1] if losses else None,
            "final_loss_mean10": float(np.mean(losses[-10:])) if losses else None,
            "steps": steps_done,
            "precision": args.precision,
            "optimizer": args.optimizer,
            "model": args.model,
            "parameters": sum(p.numel() for p in run.model.parameters()),
            "samples_per_s": run.stats["train_time"]
            and args.batch_size * run.world_size * len(losses) / run.stats["train_time"],
            "train_time_s": run.stats["train_time"],
            "eval_time_s": eval_s,
            "wall_time_s": time.time() - run.t_start,
            "world_size": run.world_size,
            "device": str(run.device) + (f" ({torch.cuda.get_device_name(run.device)})" if run.use_cuda else ""),
            "bf16_autocast": run.bf16,
            "skipped_images": run.stats["skipped_images"],
            "spike_events": run.events,
            "spike_summary": {
                kind: sum(e["kind"] == kind for e in run.events)
                for kind in ("loss_spike", "rms_spike", "nonfinite_loss")
            },
            "evals": run.evals + [final],
            "last_checkpoint_step": run.last_save,
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__, "lowbit": lowbit.__version__},
            "config": vars(args),
        }
        atomic_write_text(json.dumps(summary, indent=2, default=str) + "\n", run.out / "summary.json")
        if args.plots:
            try:
                plot_curves(run.out / "loss.png", log, f"{args.model} {args.precision} {args.optimizer}")
                if run.monitor is not None:
                    run.monitor.plot(run.out / "spikes.png", title=f"{args.model} {args.precision}")
            except ImportError:
                run.say("matplotlib not installed: no plots")
        run.log_file.close()
        zs = run.zero_shot
        top1 = f"zero-shot top-1 {summary['zero_shot_top1']:.3f} on {zs.name}" if zs else "zero-shot skipped"
        loss = f"{summary['final_loss']:.4f}" if losses else "-"
        run.say(
            f"done: {steps_done} steps, final loss {loss}, {top1}, {summary['samples_per_s']:.0f} samples/s "
            f"-> {run.out / 'summary.json'}"
        )
    close(run)
    return summary


def close(run: Run, *, finished: bool = True) -> None:
    if run.monitor is not None:
        run.monitor.close()
    if run.tb_writer is not None:
        run.tb_writer.close()
    if run.distributed and dist.is_initialized():
        if finished:  # after an error another rank may never reach the barrier
            dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict | None:
    """Trains and evaluates; returns the summary (rank 0). Raises StopRun (see `cli`) for a mistake in
    the flags or inputs, a failed save or an interrupt."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    run, ckpt = setup(args, argv)
    try:
        start(run, ckpt)
        del ckpt
        train(run)
        return finish(run)
    except BaseException as err:
        if run.log_file is not None:
            run.log_file.close()
        close(run, finished=False)
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted(interrupt_message(run)) from None
        raise


def cli(argv: list[str] | None = None) -> int:
    """The command line: one line on stderr and a non-zero status for a StopRun, no traceback."""
    try:
        main(argv)
    except StopRun as err:
        print(f"train_clip.py: {err}", file=sys.stderr, flush=True)
        return err.code
    except KeyboardInterrupt:  # outside the training loop: nothing new to lose
        print("train_clip.py: interrupted before training started", file=sys.stderr, flush=True)
        return Interrupted.code
    return 0


if __name__ == "__main__":
    sys.exit(cli())
