"""One CLIP training step (forward, contrastive loss, backward, AdamW step) on a synthetic batch.

Models come from `open_clip.create_model(name)` with no pretrained weights: fp32 master weights
under bf16 autocast on a GPU (open_clip's "amp_bf16"), fp32 without autocast on the CPU. The
linear layers (attention projections included) are swapped to SwitchBack or float8 with each
library's own entry point; on full-size models the layers lowbit's `default_filter` picks (at
least 512 wide), on the tiny CPU model every layer. Reported: ms per step, samples/s, speed-up
against the unswapped model and peak memory.

Coverage differs: open_clip's attention is nn.MultiheadAttention, which runs its q/k/v and output
projections through F.multi_head_attention_forward on the raw weights. lowbit's swap replaces the
whole attention module, so those projections run in int8 / fp8 too; torchao's conversion replaces
only nn.Linear modules that are called, so under torchao the attention projections stay in bf16
(`extra.converted_modules` counts the converted modules).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from benchmarks.common import (
    MemoryProbe,
    Recorder,
    Settings,
    Skip,
    attach_speedups,
    free_memory,
    has_fp8,
    lowbit_attr,
    measure,
    optional_import,
)

__all__ = ["BASELINE", "IMPLS", "TINY", "run"]

BASELINE = "nn.Linear"
TINY = "tiny"  # a two-block CLIP built in-process: the CPU smoke run's model


def _all_layers(module: nn.Module, name: str) -> bool:
    return True


def _lowbit_swap(to: str, needs: str | None = None, fp8: bool = False):
    def convert(model: nn.Module, settings: Settings, tiny: bool) -> nn.Module:
        import lowbit

        if needs is not None:
            lowbit_attr(needs, "lowbit.nn")
        if fp8 and not has_fp8(settings.device):
            raise Skip("needs a GPU with float8 tensor cores (sm89+); simulated fp8 is not a speed target")
        # simulate=False: real fp8 or an error, never a simulated layer timed as fp8.
        kwargs = {"simulate": False} if fp8 else {}
        return lowbit.swap(model, to=to, filter_fn=_all_layers if tiny else None, **kwargs)

    return convert


def _torchao_fp8(model: nn.Module, settings: Settings, tiny: bool) -> nn.Module:
    if not has_fp8(settings.device):
        raise Skip("needs a GPU with float8 tensor cores (sm89+)")
    float8 = optional_import("torchao.float8", "pip install torchao")
    from lowbit.swap import MIN_FEATURES

    def keep(module: nn.Module, fqn: str) -> bool:
        # nn.MultiheadAttention reads out_proj.weight itself (never calling out_proj), so a
        # converted out_proj would run in bf16 and only inflate the count of converted layers.
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            return False
        # float8 GEMMs need both sides divisible by 16; same width floor as lowbit's default filter.
        dims = (module.in_features, module.out_features)
        return all(n % 16 == 0 for n in dims) and (tiny or min(dims) >= MIN_FEATURES)

    return float8.convert_to_float8_training(model, module_filter_fn=keep)


IMPLS = {
    BASELINE: lambda model, settings, tiny: model,
    "switchback": _lowbit_swap("switchback"),
    "switchback-memeff": _lowbit_swap("switchback-memeff"),
    "lowbit-fp8-tensorwise": _lowbit_swap("fp8-tensorwise", needs="Float8Linear", fp8=True),
    "lowbit-fp8-switchback": _lowbit_swap("fp8-switchback", needs="Float8Linear", fp8=True),
    "torchao-fp8-tensorwise": _torchao_fp8,
}


def _create_model(name: str, device: torch.device) -> nn.Module:
    open_clip = optional_import("open_clip", "pip install open_clip_torch")
    if name == TINY:
        torch.manual_seed(0)
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            text_cfg={"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2},
            output_dict=True,
        )
        return model.to(device)
    return open_clip.create_model(name, pretrained=None, precision="fp32", device=device, output_dict=True)


def _converted(model: nn.Module) -> int:
    """How many modules a conversion replaced (lowbit's or torchao's)."""
    return sum(type(m).__module__.startswith(("lowbit.", "torchao.")) for m in model.modules())


def _step_fn(model: nn.Module, batch: int, settings: Settings):
    open_clip = optional_import("open_clip", "pip install open_clip_torch")
    device = settings.device
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    torch.manual_seed(0)
    images = torch.randn(batch, 3, *size, device=device)
    texts = torch.randint(0, model.vocab_size, (batch, model.context_length), device=device)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    autocast = (
        torch.autocast(device.type, dtype=settings.dtype) if settings.dtype != torch.float32
        else contextlib.nullcontext()
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()

    return step


def run(settings: Settings, rec: Recorder) -> list:
    rec.dtype = "fp32" if settings.dtype == torch.float32 else f"{rec.dtype}-autocast"
    for name, batch in settings.clip_models:
        shape = {"model": name, "batch": batch}
        for impl, convert in IMPLS.items():
            if not settings.wants(impl, BASELINE):
                continue
            model = step = None
            try:
                tiny = name == TINY
                model = convert(_create_model(name, settings.device), settings, tiny).train()
                step = _step_fn(model, batch, settings)
                timing = measure(step, settings.device, settings.clip_timer)
                model.zero_grad(set_to_none=True)  # the probe starts from weights + optimizer state
                free_memory(settings.device)
                with MemoryProbe(settings.device) as probe:
                    step()
                    total_peak_mb = probe.total_peak_mb()
                rec.ok(
                    "train step", impl, shape, timing, samples=batch, peak_mem_mb=total_peak_mb,
                    extra={"converted_modules": _converted(model), "step_peak_above_resident_mb": probe.peak_mb()},
                )
            except Exception as exc:  # noqa: BLE001 - OOM or a failing peer is recorded, the suite goes on
                rec.fail("train step", impl, shape, exc)
            finally:
                model = step = None
                free_memory(settings.device)
    attach_speedups(rec.records, BASELINE)
    return rec.records
