"""Optimizer step time on the parameters of a ViT: StableAdamW against AdamW and other StableAdamWs.

The parameter sets have the shapes of open_clip's vision towers (ViT-B/16: 86M parameters in 152
tensors; ViT-H/14: 632M in 392), fp32 master weights with fixed random gradients, as under mixed
precision. Only `optimizer.step()` is timed, after warm-up steps that create the state.

GB/s counts an Adam step's minimal traffic: parameter, gradient, v and u read, and parameter, v
and u written, 7 x 4 bytes per fp32 parameter. Target: lowbit's StableAdamW within 10% of torch's
fused AdamW.
"""

from __future__ import annotations

import inspect

import torch

from benchmarks.common import (
    Recorder,
    Settings,
    Skip,
    attach_speedups,
    free_memory,
    lowbit_attr,
    measure,
    optional_import,
)

__all__ = ["BASELINE", "IMPLS", "PARAM_SETS", "run", "vit_param_shapes"]

BASELINE = "torch-adamw-fused"
HYPER = {"lr": 1e-4, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.1}


def vit_param_shapes(width: int, layers: int, mlp: int, patch: int, image: int, out_dim: int) -> list[tuple]:
    """The parameter shapes of an open_clip VisionTransformer (patch conv without bias, pre-LN blocks)."""
    tokens = (image // patch) ** 2 + 1
    shapes = [(width, 3, patch, patch), (width,), (tokens, width), (width,), (width,)]
    for _ in range(layers):
        shapes += [
            (width,), (width,),  # ln_1
            (3 * width, width), (3 * width,),  # attn.in_proj
            (width, width), (width,),  # attn.out_proj
            (width,), (width,),  # ln_2
            (mlp, width), (mlp,),  # mlp.c_fc
            (width, mlp), (width,),  # mlp.c_proj
        ]
    return shapes + [(width,), (width,), (width, out_dim)]  # ln_post, proj


PARAM_SETS = {
    "ViT-B": vit_param_shapes(768, 12, 3072, 16, 224, 512),
    "ViT-H": vit_param_shapes(1280, 32, 5120, 14, 224, 1024),
    "tiny": vit_param_shapes(64, 2, 256, 16, 64, 32),
}


def _accepted(cls, kwargs: dict) -> dict:
    """The keyword arguments `cls` takes (peers differ in what they accept)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _torch_adamw(**options):
    return lambda params: torch.optim.AdamW(params, **HYPER, **options)


def _lowbit(foreach: bool):
    def make(params):
        cls = lowbit_attr("StableAdamW", "lowbit.optim")
        return cls(params, **_accepted(cls, {**HYPER, "foreach": foreach}))

    return make


def _optimi(params):
    optimi = optional_import("optimi", "pip install torch-optimi")
    # optimi's own default on CUDA: its Triton step (foreach is deprecated there). With triton
    # installed it takes that path for CPU tensors too and fails ("0 active drivers"), so on the
    # CPU it is told not to (an optimi without the option only runs on torch there).
    options = dict(HYPER)
    if all(p.device.type == "cpu" for p in params):
        options["triton"] = False
    return optimi.StableAdamW(params, **_accepted(optimi.StableAdamW, options))


def _pytorch_optimizer(params):
    module = optional_import("pytorch_optimizer", "pip install pytorch_optimizer")
    cls = getattr(module, "StableAdamW", None)
    if cls is None:
        raise Skip(f"pytorch_optimizer {getattr(module, '__version__', '?')} has no StableAdamW")
    return cls(params, **_accepted(cls, HYPER))


IMPLS = {
    BASELINE: _torch_adamw(fused=True),
    "torch-adamw-foreach": _torch_adamw(foreach=True),
    "lowbit-stableadamw": _lowbit(foreach=True),
    "lowbit-stableadamw-per-tensor": _lowbit(foreach=False),
    "optimi-stableadamw": _optimi,
    "pytorch_optimizer-stableadamw": _pytorch_optimizer,
}


def _make_params(shapes: list[tuple], device: torch.device) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        params.append(p)
    return params


def run(settings: Settings, rec: Recorder) -> list:
    rec.dtype = "fp32"  # master weights and optimizer state, whatever the model computes in
    for set_name in settings.optim_sets:
        shapes = PARAM_SETS[set_name]
        n_params = sum(torch.Size(s).numel() for s in shapes)
        shape = {"params": set_name, "n_params": n_params, "n_tensors": len(shapes)}
        for impl, make in IMPLS.items():
            if not settings.wants(impl, BASELINE):
                continue
            params = None
            try:
                params = _make_params(shapes, settings.device)
                optimizer = make(params)
                timing = measure(optimizer.step, settings.device, settings.timer)
                rec.ok("step", impl, shape, timing, bytes_moved=7 * 4 * n_params)
            except Exception as exc:  # noqa: BLE001 - a peer that fails is recorded, the suite goes on
                rec.fail("step", impl, shape, exc)
            finally:
                optimizer = params = None
                free_memory(settings.device)
    attach_speedups(rec.records, BASELINE)
    return rec.records
