"""Linear layers and a transformer MLP block: forward, backward and both, against nn.Linear.

Cases (the paper's Fig. 4 setting, Wortsman, Dettmers et al. 2023, section 2.2):
  "layer d->4d", "layer 4d->d": one linear layer on x (tokens, in_features);
  "mlp d->4d->d": Linear(d, 4d) -> GELU -> Linear(4d, d).
Passes: "fwd" (with autograd recording, as in training), "bwd" (backward of a retained graph)
and "fwd+bwd". Inputs require grad, as inside a transformer; weights and activations are in the
run's dtype (bf16 on a GPU), with no autocast, so every implementation sees the same tensors.

Implementations: nn.Linear (the baseline); lowbit's SwitchBack, global (tensor-wise weight), row
(vectorwise) and memory-efficient; torchao's int8 mixed-precision training; bitsandbytes'
Linear8bitLt (LLM.int8 with outlier threshold 6); on fp8 GPUs (sm89+) torchao's float8 training
and lowbit's Float8Linear. Peers run eager, as their modules are called.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from benchmarks.common import (
    MemoryProbe,
    Recorder,
    Settings,
    Skip,
    Timing,
    attach_speedups,
    free_memory,
    has_fp8,
    lowbit_attr,
    measure,
    optional_import,
)

__all__ = ["BASELINE", "IMPLS", "run"]

BASELINE = "nn.Linear"


def _swap_all(module: nn.Module, name: str) -> bool:
    return True


def _lowbit_swap(to: str):
    def convert(model: nn.Module, settings: Settings) -> nn.Module:
        import lowbit

        return lowbit.swap(model, to=to, filter_fn=_swap_all)

    return convert


def _lowbit_fp8(name: str):
    def convert(model: nn.Module, settings: Settings) -> nn.Module:
        import lowbit

        lowbit_attr("Float8Linear", "lowbit.nn")
        if not has_fp8(settings.device):
            raise Skip("needs a GPU with float8 tensor cores (sm89+); simulated fp8 is not a speed target")
        # simulate=False: real fp8 or an error, never a simulated layer timed as fp8.
        return lowbit.swap(model, to=name, filter_fn=_swap_all, simulate=False)

    return convert


def _torchao_int8(model: nn.Module, settings: Settings) -> nn.Module:
    torchao = optional_import("torchao", "pip install torchao")
    qt = optional_import("torchao.prototype.quantized_training", "torchao >= 0.7")
    torchao.quantize_(model, qt.Int8MixedPrecisionTrainingConfig())
    return model


def _torchao_fp8(recipe: str):
    def convert(model: nn.Module, settings: Settings) -> nn.Module:
        if not has_fp8(settings.device):
            raise Skip("needs a GPU with float8 tensor cores (sm89+)")
        float8 = optional_import("torchao.float8", "pip install torchao")
        config = float8.Float8LinearConfig.from_recipe_name(recipe)
        return float8.convert_to_float8_training(model, config=config)

    return convert


def _bnb_llm_int8(model: nn.Module, settings: Settings) -> nn.Module:
    bnb = optional_import("bitsandbytes", "pip install bitsandbytes")

    def replace(linear: nn.Linear) -> nn.Module:
        # has_fp16_weights=True: the weight stays in 16-bit and trains; threshold 6: LLM.int8's
        # outlier decomposition (features above 6 go through a 16-bit matmul).
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            has_fp16_weights=True, threshold=6.0,
        )
        layer.load_state_dict(linear.state_dict())
        # Two steps: Int8Params.to() drops the dtype when it moves a CPU weight to the GPU.
        return layer.to(dtype=settings.dtype).to(device=settings.device)

    if isinstance(model, nn.Linear):
        return replace(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, replace(child))
    return model


def _simulated_only(model: nn.Module, settings: Settings) -> nn.Module:
    raise Skip("block-scaled formats are simulated in plain torch only (no real kernel yet): not a speed target")


def _fp8_blockwise(model: nn.Module, settings: Settings) -> nn.Module:
    """Real only on Hopper (lowbit.mx.real); elsewhere it is the simulation, not a speed target."""
    if settings.device.type != "cuda" or torch.cuda.get_device_capability(settings.device)[0] != 9:
        raise Skip("fp8-blockwise runs on tensor cores only on compute capability 9.x; simulated here")
    return _lowbit_swap("fp8-blockwise")(model, settings)


def _lowbit_impls() -> dict:
    """Every registered lowbit layer name (fp8 ones as "lowbit-<name>", timed only as real fp8;
    block-scaled ones skipped: they are simulated)."""
    from lowbit.nn import BlockScaledLinear, Float8Linear
    from lowbit.registry import layer_names, layer_spec

    impls = {}
    for name in layer_names():
        if name == "fp8-blockwise":
            impls[f"lowbit-{name}"] = _fp8_blockwise
        elif issubclass(layer_spec(name).cls, BlockScaledLinear):
            impls[f"lowbit-{name}"] = _simulated_only
        elif issubclass(layer_spec(name).cls, Float8Linear):
            impls[f"lowbit-{name}"] = _lowbit_fp8(name)
        else:
            impls[name] = _lowbit_swap(name)
    return impls


# name -> converter(model of nn.Linear layers, settings) -> model; a converter raises Skip when it can't run.
IMPLS = {
    BASELINE: lambda model, settings: model,
    **_lowbit_impls(),
    "torchao-int8-mp": _torchao_int8,
    "bnb-llm.int8": _bnb_llm_int8,
    "torchao-fp8-tensorwise": _torchao_fp8("tensorwise"),
    "torchao-fp8-rowwise-gw-hp": _torchao_fp8("rowwise_with_gw_hp"),
}


def _features(kind: str, d: int) -> tuple[int, int]:
    """(in_features, out_features) of the input and output of a case."""
    return (4 * d, d) if kind == "layer 4d->d" else (d, 4 * d) if kind == "layer d->4d" else (d, d)


def _reference_model(kind: str, d: int, settings: Settings) -> nn.Module:
    """The nn.Linear model of a case, seeded so every implementation starts from the same weights."""
    torch.manual_seed(0)
    kw = {"device": settings.device, "dtype": settings.dtype}
    if kind.startswith("mlp"):
        return nn.Sequential(nn.Linear(d, 4 * d, **kw), nn.GELU(), nn.Linear(4 * d, d, **kw))
    return nn.Linear(*_features(kind, d), **kw)


def _flops(kind: str, d: int, tokens: int, pass_: str) -> float:
    """2 M K N per matmul; backward runs two (grad_input, grad_weight), so fwd : bwd = 1 : 2."""
    gemms = 2 if kind.startswith("mlp") else 1
    fwd = gemms * 2 * tokens * d * 4 * d
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[pass_]


def _rel_err(y: torch.Tensor, ref: torch.Tensor, rows: int = 4096) -> float:
    """||y - ref|| / ||ref|| over the first rows: a check that an implementation computes the layer
    (a broken peer set-up shows here), in fp32 without 4 GB temporaries at 65k tokens."""
    y, ref = y[:rows].float(), ref[:rows].float()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _clear_grads(model: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    model.zero_grad(set_to_none=True)


def _time_pass(model: nn.Module, x: torch.Tensor, g: torch.Tensor, pass_: str, settings: Settings) -> Timing:
    grads = [x, *(p for p in model.parameters() if p.requires_grad)]
    if pass_ == "fwd":
        return measure(partial(model, x), settings.device, settings.timer)
    if pass_ == "bwd":
        y = model(x)  # one graph, backpropagated again and again
        return measure(partial(y.backward, g, retain_graph=True), settings.device, settings.timer, grad_to_none=grads)
    return measure(lambda: model(x).backward(g), settings.device, settings.timer, grad_to_none=grads)


def _bench_impl(rec, impl, kind, d, tokens, settings, x, g, y_ref) -> None:
    shape = {"tokens": tokens, "d": d, "in": x.shape[1], "out": g.shape[1]}
    cases = {p: f"{kind} {p}" for p in settings.passes}
    try:
        model = IMPLS[impl](_reference_model(kind, d, settings), settings)
        # An untimed fwd+bwd first: Triton's autotuner benchmarks a new shape on its first call,
        # with a 256 MiB cache-flush buffer that must not count as the layer's memory.
        model(x).backward(g)
        _clear_grads(model, x)
        # Peak memory of one fwd+bwd above the resident weights and inputs; "saved" is what the
        # forward keeps for backward (plus its output), which mem_efficient is about.
        free_memory(settings.device)
        with MemoryProbe(settings.device) as probe:
            y = model(x)
            saved_mb = probe.now_mb()
            y.backward(g)
            peak_mb = probe.peak_mb()
        extra = {"saved_mb": saved_mb, "rel_err_vs_baseline": _rel_err(y.detach(), y_ref)}
        # Timed passes start without gradients: bitsandbytes skips re-quantizing its weight in
        # the forward while the weight holds a gradient, which a real training step never sees.
        y = None
        _clear_grads(model, x)
    except Exception as exc:  # noqa: BLE001 - a peer that fails is recorded, the suite goes on
        for case in cases.values():
            rec.fail(case, impl, shape, exc)
        return

    for pass_, case in cases.items():
        try:
            timing = _time_pass(model, x, g, pass_, settings)
            flops = _flops(kind, d, tokens, pass_)
            rec.ok(case, impl, shape, timing, flops=flops, peak_mem_mb=peak_mb, extra=dict(extra))
        except Exception as exc:  # noqa: BLE001
            rec.fail(case, impl, shape, exc)
        finally:
            _clear_grads(model, x)


def run(settings: Settings, rec: Recorder) -> list:
    """Every case x dimension x token count x implementation; speed-ups against nn.Linear."""
    impls = [name for name in IMPLS if settings.wants(name, BASELINE)]
    for kind in settings.linear_kinds:
        for tokens in settings.tokens:
            for d in settings.dims:
                in_features, out_features = _features(kind, d)
                torch.manual_seed(1)
                x = torch.randn(tokens, in_features, device=settings.device, dtype=settings.dtype)
                x.requires_grad_(True)
                g = torch.randn(tokens, out_features, device=settings.device, dtype=settings.dtype)
                with torch.no_grad():
                    y_ref = _reference_model(kind, d, settings)(x)
                for impl in impls:
                    _bench_impl(rec, impl, kind, d, tokens, settings, x, g, y_ref)
                    x.grad = None
                    free_memory(settings.device)  # the model and its gradients are gone with the call
    attach_speedups(rec.records, BASELINE)
    return rec.records
