"""fp8 "tensorwise" training of a tiny ViT with and without zero-init layer-scale, on the CPU.

Wortsman, Dettmers et al. (2023, section 3) find that fp8 training with one scale per tensor
diverges at scale as the blocks' feature magnitudes grow, and that layer-scale initialised at zero
keeps them small. This script trains the same tiny timm ViT on a synthetic 10-class task:

  fp32                  : exact matmuls, no layer-scale (the reference)
  fp32 + ls0            : exact matmuls, layer-scale at exactly 0 (what layer-scale alone does)
  fp8-tensorwise        : every linear layer's three matmuls in simulated fp8 (e4m3 x/w, e5m2 grad)
  fp8-tensorwise + ls0  : the same with layer-scale at exactly 0 (lowbit.zero_init_layer_scale)

and reports the loss, the largest |block output| seen over training (lowbit.FeatureProbe) and
whether the run diverged (a non-finite loss, or a final loss above the starting one), as a table
and a PNG. At this size nothing is expected to diverge: the numbers show the mechanism's
direction (feature magnitudes), not the paper's large-scale failure.

Run (about a minute on 2 CPU cores):
    python examples/fp8_layer_scale.py --out runs/fp8_layer_scale
Tiny smoke run:
    python examples/fp8_layer_scale.py --out /tmp/fp8ls --steps 3 --width 32 --depth 1 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit.io import atomic_path, atomic_write_text

RUNS = {  # name -> (fp8 swap name or None, zero-init layer-scale)
    "fp32": (None, False),
    "fp32 + ls0": (None, True),
    "fp8-tensorwise": ("fp8-tensorwise", False),
    "fp8-tensorwise + ls0": ("fp8-tensorwise", True),
}
NUM_CLASSES = 10
IMAGE_SIZE = 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the table (JSON) and the PNG")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (high, to grow features)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--noise", type=float, default=3.0, help="noise std of the synthetic images (task difficulty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the results depend on it)")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    return p.parse_args(argv)


def make_data(seed: int, n: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 3, 32, 32): a smooth random template per class, random gain, plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(NUM_CLASSES, 3, 4, 4, generator=g), size=IMAGE_SIZE, mode="bilinear")
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    gain = torch.empty(n, 1, 1, 1).uniform_(0.5, 1.5, generator=g)
    images = gain * templates[labels] + noise * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return images, labels


def make_model(args: argparse.Namespace, zero_ls: bool) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(args.seed)  # the same weights in every run (LayerScale's init draws nothing)
    model = VisionTransformer(
        img_size=IMAGE_SIZE, patch_size=args.patch_size, embed_dim=args.width, depth=args.depth,
        num_heads=args.heads, num_classes=NUM_CLASSES, global_pool="avg",
        # timm reads init_values=0 as "no layer-scale": build it non-zero, then zero it.
        init_values=1e-5 if zero_ls else None,
    )
    if zero_ls:
        lowbit.zero_init_layer_scale(model)
    return model


def train(args: argparse.Namespace, name: str, images: torch.Tensor, labels: torch.Tensor) -> dict:
    swap_to, zero_ls = RUNS[name]
    model = make_model(args, zero_ls)
    if swap_to is not None:
        lowbit.swap(model, swap_to, filter_fn=lowbit.ALL, simulate=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))

    g = torch.Generator().manual_seed(args.seed + 1)  # the same batches in every run
    losses, feature_max = [], []
    start = time.perf_counter()
    with lowbit.FeatureProbe(model) as probe:
        for step in range(args.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            index = torch.randint(0, len(images), (args.batch_size,), generator=g)
            probe.reset()
            loss = F.cross_entropy(model(images[index]), labels[index])
            feature_max.append(probe.max())
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break  # diverged: nothing more to learn from this run
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start

    window = max(1, len(losses) // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    finite = all(math.isfinite(v) for v in losses)
    return {
        "run": name,
        "steps": len(losses),
        "first_loss": first,
        "final_loss": last,
        "max_feature": max(feature_max),
        "final_feature": feature_max[-1],
        "diverged": (not finite) or last > first,
        "seconds": seconds,
        "loss_curve": losses,
        "feature_curve": feature_max,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_feat) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        ax_loss.plot(r["loss_curve"], label=r["run"], lw=1)
        ax_feat.plot(r["feature_curve"], label=r["run"], lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss", yscale="log")
    ax_feat.set(xlabel="step", ylabel="max |block output|", title="feature magnitude", yscale="log")
    for ax in (ax_loss, ax_feat):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = make_data(args.seed, n=4096, noise=args.noise)

    results = [train(args, name, images, labels) for name in args.runs]

    header = (
        f"{'run':<22} {'first loss':>10} {'final loss':>10} {'max |feature|':>14} {'final |feature|':>16} "
        f"{'diverged':>9} {'s':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['run']:<22} {r['first_loss']:>10.4f} {r['final_loss']:>10.4f} {r['max_feature']:>14.2f} "
            f"{r['final_feature']:>16.2f} {r['diverged']!s:>9} {r['seconds']:>6.1f}"
        )

    table = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "results": results}
    atomic_write_text(args.out / "fp8_layer_scale.json", json.dumps(table, indent=1))
    plot(results, args.out / "fp8_layer_scale.png")
    print(f"wrote {args.out / 'fp8_layer_scale.json'} and {args.out / 'fp8_layer_scale.png'}")
    return results


if __name__ == "__main__":
    main()
