"""What QuantHealth costs: a sampled training step against a plain one, on a small swapped ViT
(ViT-S/16 widths, default 4 blocks, 64 px, batch 16, one thread; CPU).

    python benchmarks/bench_quant_health.py [--steps 5] [--every 100] [--depth 4 --img 64 --batch 16]

Prints the median plain step, the median sampled step, and the average cost per step at
`--every` ((sampled - plain) / every / plain). Medians of interleaved runs, so load on a shared
machine hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lowbit
from lowbit.monitor import QuantHealth


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=args.img, depth=args.depth, num_classes=10
    )
    lowbit.swap(model, filter_fn=lambda m, n: True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(args.batch, 3, args.img, args.img), torch.randint(0, 10, (args.batch,))
    sampled_health = QuantHealth(model, every=1)
    plain_health = QuantHealth(model, every=10**9)
    plain_health.step_count = 1  # its next step is not a sampled one

    def step(health) -> float:
        start = time.perf_counter()
        with health.measure():
            torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(plain_health)  # warm-up
    plain, sampled = [], []
    for _ in range(args.steps):
        plain.append(step(plain_health))
        sampled.append(step(sampled_health))
    p, s = statistics.median(plain), statistics.median(sampled)
    print(f"plain step {p * 1e3:.0f} ms, sampled step {s * 1e3:.0f} ms ({s / p:.2f}x); "
          f"every={args.every}: {100 * (s - p) / args.every / p:.2f}% of a step on average")


if __name__ == "__main__":
    main()
