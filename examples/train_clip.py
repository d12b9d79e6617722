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
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
from torch import nn

import lowbit
from lowbit.swap import default_filter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helper modules beside this file
import clip_data  # noqa: E402
import clip_eval  # noqa: E402
from llm_int8 import LLMInt8Linear  # noqa: E402

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("model and precision")
    g.add_argument(
        "--model", default="lowbit-tiny", help="an open_clip model name (random init, no download) or lowbit-tiny"
    )
    g.add_argument("--precision", default="fp32", choices=PRECISIONS)
    g.add_argument(
        "--swap-all",
        action="store_true",
        help="swap every linear layer (default: those >= 512 wide, or all if none is)",
    )
    g.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "bf16", "off"),
        help="bf16 autocast: auto = for --precision bf16, and around low-bit layers on CUDA",
    )
    g.add_argument("--ls-init", action="store_true", help="zero-init layer-scale in every residual branch")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", default="stableadamw", choices=("adamw", "stableadamw"))
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--wd", type=float, default=0.1, help="decoupled weight decay (not on gains, biases, logit_scale)")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.98)
    g.add_argument("--eps", type=float, default=1e-6)
    g.add_argument("--warmup", type=int, default=30, help="linear warmup steps, then cosine decay to 0")
    g.add_argument("--batch-size", type=int, default=128, help="per process")
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--grad-clip", type=float, default=0.0, help="max global gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data")
    g.add_argument("--train-data", default="synthetic", help="CSV/TSV file, .tar shards, or 'synthetic'")
    g.add_argument("--dataset-type", default="auto", choices=("auto", "csv", "webdataset", "synthetic"))
    g.add_argument("--csv-separator", default="\t")
    g.add_argument("--csv-img-key", default="filepath")
    g.add_argument("--csv-caption-key", default="title")
    g.add_argument("--val-data", default=None, help="held-out pairs for retrieval (same format as --train-data)")
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
    g.add_argument("--zeroshot-dir", default=None, help="ImageFolder: one folder per class, '_' read as ' '")
    g.add_argument(
        "--zeroshot-templates",
        default=";".join(clip_eval.DEFAULT_TEMPLATES),
        help="';'-separated prompt templates, '{}' is the class name",
    )
    g.add_argument("--zeroshot-samples", type=int, default=600, help="synthetic zero-shot images (20 per class)")
    g.add_argument("--eval-every", type=int, default=0, help="also evaluate every this many steps (0: at the end)")
    g.add_argument("--eval-batch-size", type=int, default=250)
    g = p.add_argument_group("monitoring, output and checkpoints")
    g.add_argument("--out", default="runs/clip", help="output folder")
    g.add_argument("--no-monitor", dest="monitor", action="store_false", help="turn the SpikeMonitor off")
    g.add_argument("--monitor-action", default="log", choices=("log", "skip", "rollback"))
    g.add_argument("--log-every", type=int, default=10, help="print / progress-bar interval")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="plain prints, no tqdm bar")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    g.add_argument("--no-plots", dest="plots", action="store_false")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every this many steps (0: only at the end)")
    g.add_argument("--keep-checkpoints", action="store_true", help="also keep checkpoint-<step>.pt files")
    g.add_argument("--resume", default=None, help="a checkpoint, or 'auto' for OUT/checkpoint.pt if it exists")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# -- helpers: each does one thing main() names ---------------------------------------------------------


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


def build_train_set(spec: str, kind: str, *, transform, args, split: str = "train", size: int | None = None):
    """The dataset behind --train-data / --val-data."""
    if kind == "auto":
        kind = "synthetic" if spec == "synthetic" else "webdataset" if ".tar" in spec else "csv"
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


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    """Like atomic_save, for text."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# -- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    t_start = time.time()

    # Processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; gloo on the CPU, nccl on GPUs.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    distributed = world_size > 1
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif distributed and not use_cuda:  # processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    is_main = rank == 0
    out = Path(args.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if is_main:
            print(msg, flush=True)

    # Model: the same initialization on every rank (DDP also broadcasts rank 0's at wrapping).
    seed_everything(args.seed)
    model = create_model(args.model, ls_init=args.ls_init)
    if args.precision in LOWBIT_LAYERS:
        filter_fn = swap_filter(model, args.swap_all)
        lowbit.swap(model, LOWBIT_LAYERS[args.precision], filter_fn=filter_fn)
        swapped = sum(isinstance(m, lowbit.nn.LowbitLinear) for m in model.modules())
        say(f"{args.precision}: {swapped} linear layers swapped ({'all' if filter_fn else 'lowbit default filter'})")
    model.to(device)
    bf16 = args.amp == "bf16" or (
        args.amp == "auto" and (args.precision == "bf16" or (args.precision in LOWBIT_LAYERS and use_cuda))
    )
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"{args.model}: {n_params / 1e6:.2f}M parameters on {device} x {world_size}, "
        f"precision {args.precision}{' + bf16 autocast' if bf16 else ''}, optimizer {args.optimizer}"
    )

    # Data: this rank's slice of each global batch, a pure function of (seed, step).
    tokenizer = open_clip.get_tokenizer(args.model)
    train_set = build_train_set(
        args.train_data, args.dataset_type, args=args, transform=Transform(model, train=args.augment)
    )
    eval_transform = Transform(model, train=False)
    collate = clip_data.Collate(tokenizer)

    # Optimizer and schedule.
    groups = param_groups(model, args.wd)
    betas = (args.beta1, args.beta2)
    if args.optimizer == "stableadamw":
        optimizer = lowbit.StableAdamW(groups, lr=args.lr, betas=betas, eps=args.eps)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=betas, eps=args.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(warmup_cosine, warmup=args.warmup, steps=args.steps)
    )

    # Resume: model, optimizer, schedule, RNGs, the data position (the step) and the SpikeMonitor.
    start_step, losses, log, events, stats = 0, [], [], [], {"skipped_images": 0, "train_time": 0.0}
    monitor_state = None
    resume = args.resume
    if resume == "auto":
        resume = out / "checkpoint.pt" if (out / "checkpoint.pt").exists() else None
    if resume is not None:
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the model's device.
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        fixed = list(RESUME_FIXED)
        if args.monitor_action != "log":  # a monitor that skips or rolls back steps changes the run
            fixed.append("monitor")
        changed = [key for key in fixed if ckpt["config"][key] != getattr(args, key)]
        if changed:
            raise ValueError(
                f"--resume {resume}: an exact resume needs the checkpoint's settings; changed: "
                + ", ".join(f"{key} {ckpt['config'][key]!r} -> {getattr(args, key)!r}" for key in changed)
            )
        if ckpt["world_size"] != world_size:
            raise ValueError(f"--resume {resume}: saved by {ckpt['world_size']} processes, resumed by {world_size}")
        monitor_state = ckpt.get("monitor")
        if args.monitor and monitor_state is None:
            raise ValueError(f"--resume {resume}: the checkpoint has no SpikeMonitor state; resume with --no-monitor")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"][rank])
        start_step, log, events, stats = ckpt["step"], ckpt["log"], ckpt["events"], ckpt["stats"]
        losses = [r["loss"] for r in log]
        say(f"resumed from {resume} at step {start_step}")
    else:
        seed_everything(args.seed + rank)  # per-rank augmentation noise; the model is already built

    sampler = clip_data.StepBatchSampler(
        len(train_set),
        args.batch_size,
        seed=args.seed,
        steps=args.steps,
        start_step=start_step,
        rank=rank,
        world_size=world_size,
    )
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers, pin_memory=use_cuda
    )

    ddp_model = model
    if distributed:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    # Features of every rank enter every rank's loss (open_clip's global contrastive batch).
    loss_fn = open_clip.ClipLoss(
        local_loss=False, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size
    )

    # Monitoring: every rank judges the same (all-reduced) gradients, so skip / rollback agree;
    # rank 0 writes. A resumed monitor continues its detection windows and appends to monitor.jsonl
    # (dropping lines past the checkpoint); "rollback" then starts from a snapshot of the resumed state.
    tb_writer = None
    if is_main and args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides the earlier events at steps >= purge_step: those after the checkpoint,
            # which this run logs again; the checkpoint's own step is logged already and stays.
            tb_writer = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:
            say("tensorboard not installed: logging to log.jsonl only")
    monitor = None
    if args.monitor:
        monitor = lowbit.SpikeMonitor(
            model,
            optimizer,
            action=args.monitor_action,
            jsonl=out / "monitor.jsonl" if is_main else None,
            jsonl_mode="a" if monitor_state is not None else "w",
            tensorboard=out / "tb" / "monitor" if tb_writer is not None else None,
        )
        if monitor_state is not None:
            monitor.load_state_dict(monitor_state)
    if is_main:
        # Rewritten from the checkpoint's log on resume, atomically: a kill now must not lose it.
        atomic_write_text("".join(json.dumps(record) + "\n" for record in log), out / "log.jsonl")
        log_file = open(out / "log.jsonl", "a")

    def evaluate(step: int) -> dict:
        """Zero-shot top-1 and retrieval R@1 (rank 0, on the unwrapped model)."""
        templates = args.zeroshot_templates.split(";")
        if args.zeroshot_dir:
            zs_set = clip_data.ImageFolderClasses(args.zeroshot_dir, eval_transform)
            heldout = None
        else:
            size, mean, std = eval_transform.synthetic
            zs_set = clip_data.SyntheticShapes(
                args.zeroshot_samples, size, split="zeroshot", seed=args.data_seed, mean=mean, std=std
            )
            heldout = zs_set.heldout
        zs_loader = torch.utils.data.DataLoader(
            zs_set, batch_size=args.eval_batch_size, collate_fn=clip_data.collate_eval, num_workers=args.workers
        )
        preds, labels, dropped = clip_eval.zero_shot_predictions(
            model, tokenizer, zs_set.classnames, zs_loader, templates=templates, device=device, autocast=autocast
        )
        result = {
            "step": step,
            "zero_shot_top1": clip_eval.accuracy(preds, labels),
            "zero_shot_images": len(labels),
            "zero_shot_classes": len(zs_set.classnames),
            "zero_shot_unreadable": dropped,
        }
        if heldout is not None:
            seen = [k for k in range(len(zs_set.classnames)) if k not in heldout]
            result["zero_shot_top1_seen_classes"] = clip_eval.accuracy(preds, labels, seen)
            result["zero_shot_top1_heldout_classes"] = clip_eval.accuracy(preds, labels, heldout)
        val_spec = args.val_data or ("synthetic" if train_set.__class__ is clip_data.SyntheticShapes else None)
        if val_spec is not None:
            val_set = build_train_set(
                val_spec,
                "auto" if args.val_data else "synthetic",
                args=args,
                transform=eval_transform,
                split="val",
                size=args.val_size,
            )
            val_set = torch.utils.data.Subset(val_set, range(min(args.val_size, len(val_set))))
            val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.eval_batch_size, collate_fn=collate)
            result["retrieval"] = clip_eval.retrieval_recall_at_1(model, val_loader, device=device, autocast=autocast)
        return result

    # Train.
    progress = None
    if is_main and args.progress:
        try:
            from tqdm import tqdm

            progress = tqdm(total=args.steps, initial=start_step, desc=args.precision, dynamic_ncols=True)
        except ImportError:
            pass
    evals, last_save = [], start_step
    batches = iter(loader)
    for step in range(start_step, args.steps):
        t0 = time.perf_counter()
        images, tokens, skipped, _ = next(batches)
        images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        with autocast():
            image_features, text_features, logit_scale = ddp_model(images, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step_events = monitor.step(loss) if monitor is not None else []
        scheduler.step()
        with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilizes training
            model.logit_scale.clamp_(0, math.log(100))
        loss_value = loss.item()
        if distributed:
            skipped_t = torch.tensor([skipped], device=device)
            dist.all_reduce(skipped_t)
            skipped = int(skipped_t.item())
        dt = time.perf_counter() - t0
        stats["train_time"] += dt
        stats["skipped_images"] += skipped
        events.extend(step_events)
        record = {
            "step": step + 1,
            "loss": loss_value,
            "lr": optimizer.param_groups[0]["lr"],
            "logit_scale": model.logit_scale.exp().item(),
            "samples_per_s": args.batch_size * world_size / dt,
            "skipped_images": stats["skipped_images"],
        }
        log.append(record)
        losses.append(loss_value)
        if is_main:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if tb_writer is not None:
                for key in ("loss", "lr", "logit_scale", "samples_per_s"):
                    tb_writer.add_scalar(f"train/{key}", record[key], step + 1)
            for e in step_events:
                if e["kind"] != "rms_spike":
                    say(f"step {step + 1}: {e['kind']} (loss {e['value']}, threshold {e['threshold']})")
            if progress is not None:
                progress.update(1)
                if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                    progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{record['lr']:.2e}")
            elif (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                say(
                    f"step {step + 1}/{args.steps} loss {loss_value:.4f} lr {record['lr']:.2e} "
                    f"{record['samples_per_s']:.0f} samples/s"
                )
        if not math.isfinite(loss_value) and args.monitor_action == "log":
            say(f"step {step + 1}: the loss is {loss_value}; stopping")
            break

        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            if is_main:
                evals.append(evaluate(step + 1))
                say(f"step {step + 1}: zero-shot top-1 {evals[-1]['zero_shot_top1']:.3f}")
                if tb_writer is not None:
                    tb_writer.add_scalar("eval/zero_shot_top1", evals[-1]["zero_shot_top1"], step + 1)
            if distributed:
                dist.barrier()

        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps:
            rngs = [rng_state()]
            if distributed:  # every rank's RNGs, so each resumes its own stream
                rngs = [None] * world_size
                dist.all_gather_object(rngs, rng_state())
            if is_main:
                checkpoint = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "config": vars(args),
                    "step": step + 1,
                    "world_size": world_size,
                    "rng": rngs,
                    "data_position": {"step": step + 1},
                    "log": log,
                    "events": events,
                    "stats": stats,
                    "monitor": monitor.state_dict() if monitor is not None else None,
                }
                if monitor is not None:
                    # A resume truncates monitor.jsonl back to the checkpoint's step, so the log
                    # must be on disk before the checkpoint is.
                    monitor.sync()
                atomic_save(checkpoint, out / "checkpoint.pt")
                if args.keep_checkpoints:
                    atomic_save(checkpoint, out / f"checkpoint-{step + 1:06d}.pt")
            last_save = step + 1
    if progress is not None:
        progress.close()
    steps_done = log[-1]["step"] if log else 0

    # Evaluate, summarize, plot.
    summary = None
    if is_main:
        t_eval = time.perf_counter()
        final = evaluate(steps_done)
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
            "parameters": n_params,
            "samples_per_s": stats["train_time"] and args.batch_size * world_size * len(losses) / stats["train_time"],
            "train_time_s": stats["train_time"],
            "eval_time_s": eval_s,
            "wall_time_s": time.time() - t_start,
            "world_size": world_size,
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if use_cuda else ""),
            "bf16_autocast": bf16,
            "skipped_images": stats["skipped_images"],
            "spike_events": events,
            "spike_summary": {
                kind: sum(e["kind"] == kind for e in events) for kind in ("loss_spike", "rms_spike", "nonfinite_loss")
            },
            "evals": evals + [final],
            "last_checkpoint_step": last_save,
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__, "lowbit": lowbit.__version__},
            "config": vars(args),
        }
        atomic_write_text(json.dumps(summary, indent=2, default=str) + "\n", out / "summary.json")
        if args.plots:
            try:
                plot_curves(out / "loss.png", log, f"{args.model} {args.precision} {args.optimizer}")
                if monitor is not None:
                    monitor.plot(out / "spikes.png", title=f"{args.model} {args.precision}")
            except ImportError:
                say("matplotlib not installed: no plots")
        log_file.close()
        say(
            f"done: {steps_done} steps, final loss {summary['final_loss']:.4f}, zero-shot top-1 "
            f"{summary['zero_shot_top1']:.3f}, {summary['samples_per_s']:.0f} samples/s -> {out / 'summary.json'}"
        )
    if monitor is not None:
        monitor.close()
    if tb_writer is not None:
        tb_writer.close()
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
