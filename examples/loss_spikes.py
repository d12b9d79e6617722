"""Loss spikes after a patch-embedding RMS spike: AdamW versus StableAdamW, watched by SpikeMonitor.

Wortsman, Dettmers et al. (2023, section 3.4) trace loss spikes to AdamW's second-moment estimate
u falling behind: when a layer's gradient has been small for many steps, u has decayed, and a
sudden larger gradient gives RMS = sqrt(mean(g^2 / u_hat)) >> 1 -- the update is then far larger
than the learning rate intends, and the loss spikes 1-8 steps later. In their CLIP runs the layer
is usually the patch embedding. StableAdamW divides the step size by max(1, RMS) and avoids it.

This script reproduces that mechanism on purpose, at a size a laptop CPU trains in a minute. A tiny
ViT (patch embedding `conv1`, CLIP-style naming) learns a synthetic 10-class task from images given
as one luma plane and two chroma planes:

  steps 1 .. --switch      grayscale shards: chroma planes are zero, so the patch embedding's
                           chroma weights (initialised at zero, a function-preserving colour stem)
                           get exactly zero gradient and their u stays at zero;
  steps --switch+1 ..      colour shards: the chroma weights suddenly get gradients.

Because those weights are zero at the switch, the switch itself does not change the loss; any loss
spike that follows is the optimizer's doing. What to expect with AdamW (beta2 = 0.99, lr 1e-2): an
RMS spike in `conv1.weight` at the switch, then loss spikes 1-2 steps later that the monitor links
to it; with StableAdamW at the same settings: the same RMS spike, no loss spike. The trigger is
engineered (that is what makes the demonstration deterministic at this size); the optimizer
dynamics after it are not.

Every run writes `<optimizer>_seed<k>.png` (loss over the per-layer RMS heat map), a `_zoom.png` of
the steps around the switch and a `.jsonl` (one line per step) to --out, plus `summary.json`; the
table is printed.

Run (about a minute on 2 CPU cores):
    python examples/loss_spikes.py --out runs/loss_spikes
Tiny smoke run (seconds):
    python examples/loss_spikes.py --out /tmp/loss_spikes --steps 30 --switch 20 --seeds 0 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.io import atomic_write_text
from lowbit.monitor.writers import to_json_safe

NUM_CLASSES = 10
IMAGE_SIZE = 16
PATCH_SIZE = 4
OPTIMIZERS = ("adamw", "stable-adamw")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs, JSONL files and summary.json")
    p.add_argument("--steps", type=int, default=420)
    p.add_argument("--switch", type=int, default=300, help="colour shards start after this many steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2, help="large on purpose: near AdamW's stability edge")
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--noise", type=float, default=3.0, help="pixel noise std (task difficulty)")
    p.add_argument("--chroma", type=float, default=4.0, help="scale of the chroma planes once they arrive")
    p.add_argument("--n-images", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    args = p.parse_args(argv)
    if not 0 < args.switch < args.steps:
        p.error("--switch must be between 0 and --steps")
    return args


# -- data ------------------------------------------------------------------------------------------


def make_data(seed: int, n: int, noise: float, chroma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 3, 16, 16): plane 0 is luma, planes 1-2 chroma; a random template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(NUM_CLASSES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    images = templates[labels] + noise * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    images[:, 1:] *= chroma
    return images, labels


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """A grayscale shard: the same luma, no chroma."""
    return torch.cat([images[:, :1], torch.zeros_like(images[:, 1:])], dim=1)


# -- model: a CLIP-style ViT, small -----------------------------------------------------------------


class Block(nn.Module):
    """Pre-LN transformer block (CLIP's ResidualAttentionBlock)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """conv1 (patch embedding) -> + class/positional embeddings -> ln_pre -> blocks -> ln_post -> head."""

    def __init__(self, width: int, depth: int, heads: int) -> None:
        super().__init__()
        n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
        self.conv1 = nn.Conv2d(3, width, PATCH_SIZE, PATCH_SIZE, bias=False)
        self.class_embedding = nn.Parameter(width**-0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(n_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(width)
        self.head = nn.Linear(width, NUM_CLASSES)
        # The colour stem starts at zero, so the model computes the same function whether or not
        # chroma is present until it has learned to use it.
        with torch.no_grad():
            self.conv1.weight[:, 1:].zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.blocks(self.ln_pre(x))
        return self.head(self.ln_post(x[:, 0]))


# -- one run ---------------------------------------------------------------------------------------


def make_optimizer(name: str, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    kwargs = dict(lr=args.lr, betas=(0.9, args.beta2), eps=1e-8, weight_decay=args.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **kwargs)
    return lowbit.StableAdamW(model.parameters(), **kwargs)


def train(args: argparse.Namespace, opt_name: str, seed: int) -> dict:
    images, labels = make_data(seed, args.n_images, args.noise, args.chroma)
    torch.manual_seed(seed)  # the same initial weights for both optimizers
    model = TinyViT(args.width, args.depth, args.heads)
    optimizer = make_optimizer(opt_name, model, args)
    stem = f"{opt_name}_seed{seed}"
    # "w": this example regenerates all of --out (its PNGs and summary.json too), so a rerun replaces the JSONL.
    monitor = lowbit.SpikeMonitor(model, optimizer, jsonl=args.out / f"{stem}.jsonl", jsonl_mode="w")
    g = torch.Generator().manual_seed(seed + 1)  # the same batches for both optimizers

    train_s = monitor_s = 0.0
    for step in range(args.steps):
        t0 = time.perf_counter()
        index = torch.randint(0, len(images), (args.batch_size,), generator=g)
        batch = images[index] if step >= args.switch else to_grayscale(images[index])
        loss = F.cross_entropy(model(batch), labels[index])
        loss.backward()
        optimizer.step()
        t1 = time.perf_counter()
        monitor.step(loss)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        train_s += t1 - t0
        monitor_s += t2 - t1

    title = f"{opt_name}, beta2={args.beta2}, lr={args.lr:g}, seed {seed}"
    png = monitor.plot(args.out / f"{stem}.png", title=title)
    # The same around the switch, where the RMS spike and the loss spike sit a step or two apart.
    zoom = (max(1, args.switch - 30), min(args.steps, args.switch + 40))
    monitor.plot(args.out / f"{stem}_zoom.png", title=f"{title} (zoom)", step_range=zoom)
    monitor.close()
    return summarize(args, opt_name, seed, monitor, train_s, monitor_s, png)


def summarize(args, opt_name, seed, monitor, train_s, monitor_s, png) -> dict:
    """Loss-spike episodes, what preceded them, and a detector-free measure of the spike's size."""
    spikes = [e for e in monitor.events if e["kind"] in ("loss_spike", "nonfinite_loss")]
    spike_steps = {e["step"] for e in spikes}
    onsets = [e for e in spikes if e["step"] - 1 not in spike_steps]  # first step of each episode
    preceded = [e for e in onsets if e["preceded_by"]]
    # For each preceded episode, the earliest RMS spike in the 1-8 steps before it: the likely trigger.
    first_rms = Counter(min(e["preceded_by"], key=lambda p: p["step"])["layer"] for e in preceded)
    losses = monitor.history_loss
    before = [v for v in losses[max(0, args.switch - 50) : args.switch] if math.isfinite(v)]
    after = [v for v in losses[args.switch : args.switch + 50]]
    base = statistics.median(before) if before else math.nan
    peak = max(after) if after else math.nan
    tail = losses[-min(20, len(losses)) :]
    rms_at_switch = {
        e["layer"]: e["value"] for e in monitor.events if e["kind"] == "rms_spike" and e["step"] == args.switch + 1
    }
    return {
        "optimizer": opt_name,
        "seed": seed,
        "loss_spike_episodes": len(onsets),
        "loss_spike_steps": len(spike_steps),
        "episodes_preceded_by_rms": len(preceded),
        "first_rms_layer": dict(first_rms),
        "rms_events": sum(e["kind"] == "rms_spike" for e in monitor.events),
        "rms_spikes_at_switch": rms_at_switch,
        "onset_steps": [e["step"] for e in onsets],
        "peak_over_base": peak / base if base and base > 0 else math.nan,
        "final_loss": sum(tail) / len(tail),
        "train_ms_per_step": 1e3 * train_s / args.steps,
        "monitor_ms_per_step": 1e3 * monitor_s / args.steps,
        "png": str(png),
    }


# -- main ------------------------------------------------------------------------------------------


def print_table(results: list[dict]) -> None:
    header = (
        f"{'optimizer':<13} {'seed':>4} {'loss spikes':>11} {'(steps)':>7} {'preceded by RMS':>15} "
        f"{'first RMS spike in':<34} {'peak/base':>9} {'final loss':>10} {'monitor ms':>10}"
    )
    print(header)
    print("-" * len(header))

    def row(name, seed, rs):
        layers = Counter()
        for r in rs:
            layers.update(r["first_rms_layer"])
        where = ", ".join(f"{k} x{v}" for k, v in layers.most_common(2)) or "-"
        train_ms = sum(r["train_ms_per_step"] for r in rs) / len(rs)
        mon_ms = sum(r["monitor_ms_per_step"] for r in rs) / len(rs)
        print(
            f"{name:<13} {seed:>4} {sum(r['loss_spike_episodes'] for r in rs):>11} "
            f"{sum(r['loss_spike_steps'] for r in rs):>7} {sum(r['episodes_preceded_by_rms'] for r in rs):>15} "
            f"{where:<34} {max(r['peak_over_base'] for r in rs):>9.2f} "
            f"{sum(r['final_loss'] for r in rs) / len(rs):>10.4f} "
            f"{mon_ms:>5.2f} ({100 * mon_ms / train_ms:.0f}%)"
        )

    for r in results:
        row(r["optimizer"], str(r["seed"]), [r])
    if len({r["seed"] for r in results}) > 1:
        print("-" * len(header))
        for name in dict.fromkeys(r["optimizer"] for r in results):
            row(name, "all", [r for r in results if r["optimizer"] == name])
    print(
        "loss spikes: episodes (first step of each run of flagged steps); preceded by RMS: episodes with an "
        "RMS spike 1-8 steps before;\npeak/base: highest loss in the 50 steps after the switch over the median "
        "of the 50 before; monitor ms: SpikeMonitor.step per step (share of the training step)."
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    try:
        results = [train(args, name, seed) for seed in args.seeds for name in args.optimizers]
    finally:  # leave the process as it was (this also runs inside the test suite)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)

    print_table(results)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "results": results}
    atomic_write_text(args.out / "summary.json", json.dumps(to_json_safe(summary), indent=1, default=str))
    print(f"wrote {len(results)} runs (PNG, zoomed PNG, JSONL) and summary.json to {args.out}")
    return results


if __name__ == "__main__":
    main()
