"""PyTorch's own module tests (torch.testing._internal.common_modules.module_db) through every lowbit layer.

For nn.Linear, nn.MultiheadAttention, nn.TransformerEncoderLayer and nn.TransformerDecoderLayer,
every sample PyTorch lists (every CPU dtype, train and eval, no-batch-dim samples included) is built,
deep-copied and swapped with `lowbit.swap(copy, name, filter_fn=lambda m, n: True)`. Both run forward
and backward on the same inputs; the swapped module must

  * raise an error of the same class wherever the original raises, and run wherever it runs;
  * have swapped every nn.Linear and nn.MultiheadAttention (so nothing is compared with itself);
  * give outputs and gradients (inputs and parameters) of the original's shapes and dtypes, within
    the format's error of an fp64 reference (a float64 copy of the original module and inputs):
    SQNR = 20 log10(|ref| / |ref - x|) >= SQNR_FLOOR_DB, or the sample's entry in LOWER_FLOORS.

The rest mirrors PyTorch's test/test_modules.py for a swapped layer: factory kwargs, repr, pickle,
state_dict save/load (weights_only), non-contiguous inputs, memory format, .to(dtype) (with and
without swapping tensors on conversion), to_empty, meta-device construction, double backward.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import pickle

import pytest
import torch
from torch import nn
from torch.testing._internal.common_modules import module_db
from torch.utils._pytree import tree_leaves, tree_map

import lowbit
from lowbit.nn import LowbitLinear, LowbitMultiheadAttention
from lowbit.registry import layer_spec

MODULE_CLASSES = {
    "nn.Linear": nn.Linear,
    "nn.MultiheadAttention": nn.MultiheadAttention,
    "nn.TransformerEncoderLayer": nn.TransformerEncoderLayer,
    "nn.TransformerDecoderLayer": nn.TransformerDecoderLayer,
}
MODULE_INFOS = {
    name: next(info for info in module_db if info.module_cls is cls and info.name == name)
    for name, cls in MODULE_CLASSES.items()
}
# lowbit.swap name -> (number format, layer options). fp8 is simulated so it runs on any CPU.
VARIANTS = {
    "switchback": ("int8", {}),
    "llm-int8": ("int8", {}),
    "switchback-row": ("int8", {}),
    "switchback-memeff": ("int8", {}),
    "fp8-tensorwise": ("fp8", {"simulate": True}),
    "fp8-switchback": ("fp8", {"simulate": True}),
    # block-scaled, simulated on the CPU; floors from nn.Linear's samples (seen: mxfp8 21.3,
    # fp8-blockwise 26.8, mxfp8-e5m2 15.1, mxfp4 9.6, nvfp4 17.4 dB), a few dB below
    "mxfp8": ("mx8", {}),
    "fp8-blockwise": ("mx8", {}),
    "mxfp8-e5m2": ("mx8-e5m2", {}),
    "mxfp4": ("fp4", {}),
    "nvfp4": ("fp4", {}),
}
SQNR_FLOOR_DB = {"int8": 35.0, "fp8": 20.0, "mx8": 18.0, "mx8-e5m2": 12.0, "fp4": 7.0}

# Samples allowed a lower floor, one row each: (module, sample-id substring, format, what) ->
# (floor dB, reason). `what` is "out", "grad_input" or "grad_param". Nothing else is exempt.
_TINY = (
    "module_db builds these at width 3-4: rows of 3-4 values quantized to int8 / fp8, through 2-5 chained "
    "low-precision GEMMs (q/k/v, out_proj, FFN); at width 32-64 test_attention holds them to 30+ dB"
)
_CANCEL = (
    "the key/value gradients of softmax attention are differences of near-equal terms "
    "(p_i (g_i - sum_j p_j g_j)); at width 3 they cancel to the level of e5m2's 2-bit mantissa (seen: "
    "-26 dB on one key gradient, median 15 dB); shapes, dtypes and NaN placement are still checked"
)
LOWER_FLOORS: dict[tuple[str, str, str, str], tuple[float, str]] = {
    (module, "", fmt, what): (floor, reason)
    for module in ("nn.MultiheadAttention", "nn.TransformerEncoderLayer", "nn.TransformerDecoderLayer")
    for fmt, what, floor, reason in (
        ("int8", "out", 22.0, _TINY),
        ("int8", "grad_input", 12.0, _TINY),
        ("int8", "grad_param", 8.0, _TINY + "; LayerNorm cancels most of the gradient reaching the layers below"),
        ("fp8", "out", 3.0, _TINY),
        ("fp8", "grad_input", -30.0, _CANCEL),
        ("fp8", "grad_param", -30.0, _CANCEL),
        # 3-4 values in a block of 16-128: one scale per row, 2-4 mantissa bits (seen: -24 dB at worst)
        *((fmt, what, -30.0, _TINY + "; test_attention holds the block formats to their own floors")
          for fmt in ("mx8", "mx8-e5m2", "fp4") for what in ("out", "grad_input", "grad_param")),
    )
}


def _floor(module_name: str, sample_id: str, fmt: str, what: str) -> float:
    floors = [
        floor
        for (mod, key, f, w), (floor, _reason) in LOWER_FLOORS.items()
        if mod == module_name and key in sample_id and f == fmt and w == what
    ]
    return min(floors, default=SQNR_FLOOR_DB[fmt])


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """20 log10(|ref| / |ref - x|) in fp64 over the finite entries of ref; inf when equal.

    Non-finite entries of ref (a fully masked attention row gives NaN) must be the same in x.
    """
    ref, x = ref.detach().double(), x.detach().double()
    if bool(torch.isfinite(ref).all()) and bool(torch.isfinite(x).all()):
        err = (ref - x).norm()
        return math.inf if err == 0 else float(20 * torch.log10(ref.norm() / err))
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(x)) or not torch.equal(ref[~finite].isnan(), x[~finite].isnan()):
        return -math.inf
    ref, x = ref[finite], x[finite]
    err = (ref - x).norm()
    if err == 0:
        return math.inf
    return float(20 * torch.log10(ref.norm() / err))


def _sample_id(index: int, sample) -> str:
    kwargs = sample.constructor_input.kwargs
    fwd = sample.forward_input
    shapes = [tuple(t.shape) for t in tree_leaves((fwd.args, fwd.kwargs)) if isinstance(t, torch.Tensor)]
    masks = sorted(k for k, v in fwd.kwargs.items() if isinstance(v, torch.Tensor))
    parts = [f"#{index}", sample.desc or "-", f"args={sample.constructor_input.args}"]
    parts += [f"{k}={v}" for k, v in sorted(kwargs.items()) if k in ("bias", "add_bias_kv", "add_zero_attn",
                                                                     "batch_first", "norm_first", "kdim")]
    parts += [f"in={shapes}", f"masks={masks}"]
    return " ".join(parts)


@functools.cache
def _samples(module_name: str, dtype: torch.dtype, training: bool):
    """The entry's samples (seeded; made once, then only ever copied from)."""
    info = MODULE_INFOS[module_name]
    torch.manual_seed(0)
    samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
    return [(i, s) for i, s in enumerate(samples) if s.forward_input is not None]


def _copy_inputs(obj, dtype: torch.dtype | None = None):
    """Fresh leaf copies of the sample's tensors (same sharing: q is k is v stays so), float ones cast."""
    memo: dict[int, torch.Tensor] = {}

    def one(t):
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in memo:
            c = t.detach().clone()
            if dtype is not None and c.is_floating_point():
                c = c.to(dtype)
            memo[id(t)] = c.requires_grad_(t.requires_grad)
        return memo[id(t)]

    return tree_map(one, obj)


def _build(module_name: str, sample, dtype: torch.dtype, training: bool) -> nn.Module:
    torch.manual_seed(1)
    m = MODULE_CLASSES[module_name](*sample.constructor_input.args, **sample.constructor_input.kwargs)
    return m.to(dtype).train(training)


def _swapped(module: nn.Module, variant: str) -> nn.Module:
    return lowbit.swap(copy.deepcopy(module), variant, filter_fn=lambda m, n: True, **VARIANTS[variant][1])


def _unswapped_layers(module: nn.Module) -> list[str]:
    """Names of nn.Linear / nn.MultiheadAttention modules that are still the float originals."""
    left = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and not isinstance(m, LowbitLinear):
            left.append(f"{name or '<root>'}: {type(m).__name__}")
        if isinstance(m, nn.MultiheadAttention) and not isinstance(m, LowbitMultiheadAttention):
            left.append(f"{name or '<root>'}: {type(m).__name__}")
    return left


def _run(module: nn.Module, args, kwargs, grad_seed: int):
    """Forward and backward (seeded random grad_outputs): (outputs, input grads, param grads by name)."""
    for p in module.parameters():
        p.grad = None
    outputs = module(*args, **kwargs)
    outs = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    diff = [t for t in outs if t.requires_grad]
    g = torch.Generator().manual_seed(grad_seed)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in diff]
    if diff:
        torch.autograd.backward(diff, grads)
    inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
    input_grads = list(dict.fromkeys(inputs))  # shared q/k/v counted once
    return (
        [t.detach() for t in outs],
        [t.grad for t in input_grads],
        {n: p.grad for n, p in module.named_parameters()},
    )


def _compare(label: str, got, orig, ref, floor: float, problems: list[str]) -> None:
    if orig is None or got is None:
        if (orig is None) != (got is None):
            problems.append(f"{label}: grad is {'None' if got is None else 'set'}, original's is "
                            f"{'None' if orig is None else 'set'}")
        return
    if got.shape != orig.shape or got.dtype != orig.dtype:
        problems.append(f"{label}: {tuple(got.shape)} {got.dtype}, original {tuple(orig.shape)} {orig.dtype}")
        return
    if got.numel() == 0:
        return
    db = sqnr_db(ref, got)
    if not db >= floor:
        problems.append(f"{label}: SQNR {db:.1f} dB < {floor:.0f} dB")


def _outputs(module, args, kwargs):
    return [t for t in tree_leaves(module(*args, **kwargs)) if isinstance(t, torch.Tensor)]


def _attempt(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - compared with the other module's, or reported
        return e


# The float module's and the fp64 reference's results for one sample, shared by the five variants.
_FLOAT_RESULTS: dict[tuple, dict] = {}


def _float_results(module_name, dtype, training, index, sample) -> dict:
    key = (module_name, dtype, training, index)
    if key not in _FLOAT_RESULTS:
        fwd = (sample.forward_input.args, sample.forward_input.kwargs)
        original = _build(module_name, sample, dtype, training)
        reference = copy.deepcopy(original).double()
        res = {"original": copy.deepcopy(original), "seed": 1000 + index}
        same_as_train = not training and not MODULE_INFOS[module_name].train_and_eval_differ
        res["run"] = None if same_as_train else _attempt(_run, original, *_copy_inputs(fwd), res["seed"])
        if res["run"] is not None and not isinstance(res["run"], Exception):
            res["ref"] = _run(reference, *_copy_inputs(fwd, torch.float64), res["seed"])
        if not training:  # inference without autograd: where Transformer layers and MHA take a fast path
            with torch.no_grad():
                res["nograd"] = _attempt(_outputs, original, *_copy_inputs(fwd))
                # The fast path computes on its own, so its reference is the fp64 module's slow path.
                res["nograd_ref"] = _outputs(reference, *_copy_inputs(fwd, torch.float64))
        _FLOAT_RESULTS[key] = res
    return _FLOAT_RESULTS[key]


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _check_sample(module_name, variant, dtype, training, index, sample) -> list[str]:
    fmt = VARIANTS[variant][0]
    sid = _sample_id(index, sample)
    fwd = (sample.forward_input.args, sample.forward_input.kwargs)
    floats = _float_results(module_name, dtype, training, index, sample)

    swapped = _attempt(_swapped, floats["original"], variant)
    if isinstance(swapped, Exception):
        return [f"{sid}: swap raised {_first_line(swapped)}"]
    problems: list[str] = []
    left = _unswapped_layers(swapped)
    if left:
        problems.append(f"{sid}: not swapped: {left}")

    if not training and not MODULE_INFOS[module_name].train_and_eval_differ:
        # The entry says eval computes what train does (with grad): only the no_grad path is new.
        return problems + _check_no_grad(sid, fmt, module_name, swapped, fwd, floats)
    got = _attempt(_run, swapped, *_copy_inputs(fwd), floats["seed"])
    if isinstance(floats["run"], Exception):
        if not isinstance(got, type(floats["run"])):
            problems.append(f"{sid}: {'ran' if not isinstance(got, Exception) else _first_line(got)}, "
                            f"original raised {_first_line(floats['run'])}")
        return problems
    if isinstance(got, Exception):
        return problems + [f"{sid}: {_first_line(got)}"]
    (s_out, s_gin, s_gp), (o_out, o_gin, o_gp), (r_out, r_gin, r_gp) = got, floats["run"], floats["ref"]

    if len(s_out) != len(o_out):
        return problems + [f"{sid}: {len(s_out)} outputs, original has {len(o_out)}"]
    for k, (s, o, r) in enumerate(zip(s_out, o_out, r_out)):
        _compare(f"{sid} out[{k}]", s, o, r, _floor(module_name, sid, fmt, "out"), problems)
    if any(o.numel() for o in o_out) and all(
        s.shape == o.shape and torch.equal(s, o) for s, o in zip(s_out, o_out)
    ):
        problems.append(f"{sid}: outputs bit-identical to the float module's: nothing was quantized")
    for k, (s, o, r) in enumerate(zip(s_gin, o_gin, r_gin)):
        _compare(f"{sid} grad input[{k}]", s, o, r, _floor(module_name, sid, fmt, "grad_input"), problems)
    if set(s_gp) != set(o_gp):
        problems.append(f"{sid}: parameters {sorted(s_gp)} != original's {sorted(o_gp)}")
    # Shapes, dtypes and None-ness per parameter; SQNR over all of them at once: some parameter
    # gradients are exactly 0 by symmetry (a key bias shifts every score of a row equally, which
    # softmax ignores), and no quantized gradient matches a zero signal to a ratio.
    for name in o_gp:
        _compare(f"{sid} grad {name}", s_gp.get(name), o_gp[name], r_gp[name], -math.inf, problems)
    pairs = [(r_gp[n], s_gp[n]) for n in o_gp if o_gp[n] is not None and s_gp.get(n) is not None]
    if pairs and not problems:
        ref_all = torch.cat([r.detach().double().flatten() for r, _ in pairs])
        got_all = torch.cat([g.detach().double().flatten() for _, g in pairs])
        _compare(f"{sid} grad of all parameters", got_all, got_all, ref_all,
                 _floor(module_name, sid, fmt, "grad_param"), problems)

    if not training:
        problems += _check_no_grad(sid, fmt, module_name, swapped, fwd, floats)
    return problems


def _check_no_grad(sid, fmt, module_name, swapped, fwd, floats) -> list[str]:
    problems: list[str] = []
    with torch.no_grad():
        s_ng = _attempt(_outputs, swapped, *_copy_inputs(fwd))
    o_ng = floats["nograd"]
    if isinstance(o_ng, Exception):
        if not isinstance(s_ng, type(o_ng)):
            problems.append(f"{sid} no_grad: got {type(s_ng).__name__}, original raised {_first_line(o_ng)}")
    elif isinstance(s_ng, Exception):
        problems.append(f"{sid} no_grad: {_first_line(s_ng)}")
    elif len(s_ng) != len(o_ng):
        problems.append(f"{sid} no_grad: {len(s_ng)} outputs, original has {len(o_ng)}")
    else:
        for k, (s, o, r) in enumerate(zip(s_ng, o_ng, floats["nograd_ref"])):
            _compare(f"{sid} no_grad out[{k}]", s, o, r, _floor(module_name, sid, fmt, "out"), problems)
    return problems


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one thread avoids OpenMP start-up and spinning on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CPU_DTYPES = sorted({d for info in MODULE_INFOS.values() for d in info.dtypes}, key=str)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("module_name", list(MODULE_INFOS))
def test_module_db_samples(module_name, variant, dtype, training):
    """Every module_db sample through the swapped module: same errors, shapes, dtypes; SQNR floors."""
    if dtype not in MODULE_INFOS[module_name].dtypes:
        pytest.skip(f"{module_name} lists no {dtype} on CPU")
    problems = []
    for index, sample in _samples(module_name, dtype, training):
        problems += _check_sample(module_name, variant, dtype, training, index, sample)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)


# ---- test_modules.py's checks, for swapped layers, on a few samples of each module ----

def _some_samples(module_name: str, count: int = 3):
    """The first `count` samples with distinct descriptions (all of nn.Linear's), float32, training."""
    seen, picked = set(), []
    for index, sample in _samples(module_name, torch.float32, True):
        key = (sample.desc, tuple(sorted(sample.constructor_input.kwargs.items(), key=str)))
        if key not in seen:
            seen.add(key)
            picked.append((index, sample))
    return picked[:count]


def _forward(module, sample, dtype=None):
    args, kwargs = _copy_inputs((sample.forward_input.args, sample.forward_input.kwargs), dtype)
    return [t for t in tree_leaves(module(*args, **kwargs)) if isinstance(t, torch.Tensor)]


def _assert_same_outputs(a, b, exact=True):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if exact:
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        else:
            torch.testing.assert_close(x, y, equal_nan=True)


def _swap_cases():
    return [pytest.param(m, v, id=f"{m}-{v}") for m in MODULE_INFOS for v in VARIANTS]


def _assert_params_are(module, device, dtype):
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        assert t.device == torch.device(device), f"{name} on {t.device}, expected {device}"
        if t.is_floating_point():
            assert t.dtype == dtype, f"{name} is {t.dtype}, expected {dtype}"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_factory_kwargs_linear(variant, dtype, device):
    """The layer class built directly with device/dtype, as nn.Linear(..., device=, dtype=)."""
    _, options = VARIANTS[variant]
    spec = layer_spec(variant)
    cls, kwargs = spec.cls, spec.build_kwargs(**options)
    layer = cls(5, 3, True, device=device, dtype=dtype, **kwargs)
    _assert_params_are(layer, device, dtype)
    assert layer.weight.shape == (3, 5) and layer.bias.shape == (3,)
    assert cls(5, 3, bias=False, **kwargs).bias is None


@pytest.mark.parametrize(("module_name", "variant"), _swap_cases())
def test_factory_kwargs_swapped(module_name, variant):
    """A module built with factory kwargs keeps its device and dtype through the swap."""
    for device, dtype in [("cpu", torch.float64), ("meta", torch.float32)]:
        for _, sample in _some_samples(module_name):
            c = sample.constructor_input
            m = MODULE_CLASSES[module_name](*c.args, **c.kwargs, device=device, dtype=dtype)
            _assert_params_are(_swapped(m, variant), device, dtype)


@pytest.mark.parametrize(("module_name", "variant"), _swap_cases())
def test_repr(module_name, variant):
    for _, sample in _some_samples(module_name):
        s = _swapped(_build(module_name, sample, torch.float32, True), variant)
        assert repr(s) and str(s)
        for name, m in s.named_modules():
            if isinstance(m, LowbitLinear):
                assert f"in_features={m.in_features}" in repr(m), name


@pytest.mark.parametrize(("module_name", "variant"), _swap_cases())
def test_pickle_and_state_dict(module_name, variant):
    """torch.save of the whole module, pickle, and the state_dict with weights_only=True."""
    for _, sample in _some_samples(module_name):
        original = _build(module_name, sample, torch.float32, True)
        s = _swapped(original, variant)
        out = _forward(s, sample)

        buf = io.BytesIO()
        torch.save(s, buf)
        buf.seek(0)
        _assert_same_outputs(_forward(torch.load(buf, weights_only=False), sample), out)
        _assert_same_outputs(_forward(pickle.loads(pickle.dumps(s)), sample), out)

        sd = s.state_dict()
        assert list(sd) == list(original.state_dict()), "state_dict keys differ from the original's"
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        assert list(loaded) == list(sd)
        for k in sd:
            torch.testing.assert_close(loaded[k], sd[k], rtol=0, atol=0)

        # Into a differently initialised swapped module, and the swapped state into a float module.
        torch.manual_seed(2)
        fresh = _swapped(MODULE_CLASSES[module_name](*sample.constructor_input.args,
                                                     **sample.constructor_input.kwargs), variant)
        fresh.load_state_dict(loaded)
        _assert_same_outputs(_forward(fresh, sample), out)
        plain = MODULE_CLASSES[module_name](*sample.constructor_input.args, **sample.constructor_input.kwargs)
        plain.load_state_dict(loaded)
        _assert_same_outputs(_forward(plain, sample), _forward(original, sample))


def _non_contiguous(obj):
    def one(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        out = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
        return out.requires_grad_(t.requires_grad)

    return tree_map(one, obj)


@pytest.mark.parametrize(("module_name", "variant"), _swap_cases())
def test_non_contiguous_inputs(module_name, variant):
    """Non-contiguous inputs and grad_outputs give the contiguous run's outputs and gradients."""
    for index, sample in _some_samples(module_name):
        s = _swapped(_build(module_name, sample, torch.float32, True), variant)
        fwd = (sample.forward_input.args, sample.forward_input.kwargs)
        args, kwargs = _non_contiguous(_copy_inputs(fwd))
        assert any(not t.is_contiguous() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        runs = [_run(s, *_copy_inputs(fwd), 1000 + index), _run(s, args, kwargs, 1000 + index)]
        (out_a, gin_a, gp_a), (out_b, gin_b, gp_b) = runs
        _assert_same_outputs(out_a, out_b, exact=False)
        _assert_same_outputs(gin_a, gin_b, exact=False)
        _assert_same_outputs(list(gp_a.values()), list(gp_b.values()), exact=False)


@pytest.mark.parametrize(("module_name", "variant"), _swap_cases())
def test_memory_format(module_name, variant):
    """No 4-D/5-D inputs here, so contiguous_format only: m.to(memory_format=...) keeps outputs the
    same and outputs and input gradients contiguous, as test_modules.py asks."""
    for index, sample in _some_samples(module_name):
        s = _swapped(_build(module_name, sample, torch.float32, True), variant)
        fwd = (sample.forward_input.args, sample.forward_input.kwargs)
        base = _run(s, *_copy_inputs(fwd), 1000 + index)
        for fmt in (torch.preserve_format, torch.contiguous_format):
            s.to(memory_format=fmt)
            out, gin, _ = _run(s, *_copy_inputs(fwd), 1000 + index)
            _assert_same_outputs(out, base[0])
            assert all(t.is_contiguous() for t in out + [g for g in gin if g is not None])


@pytest.mark.parametrize("swap_tensors", [False, True], ids=["assign", "swap_tensors"])
@pytest.mark.parametrize(("module_name", "variant"), _swap_cases())
def test_to_dtype(module_name, variant, swap_tensors):
    """.to(dtype) and .double()/.float() convert every parameter and the forward follows;
    with torch.__future__ swap_module_params_on_conversion the Parameter objects are kept."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap_tensors)
    try:
        for _, sample in _some_samples(module_name, 2):
            s = _swapped(_build(module_name, sample, torch.float32, True), variant)
            with torch.no_grad():  # no autograd graph left holding the Parameters (swap_tensors needs that)
                out32 = _forward(s, sample)
            ids = [id(p) for p in s.parameters()]
            for dtype in (torch.float64, torch.float32, torch.bfloat16):  # bf16 last: it rounds the weights
                s.to(dtype)
                _assert_params_are(s, "cpu", dtype)
                assert all(isinstance(p, nn.Parameter) for p in s.parameters())
                if swap_tensors:
                    assert [id(p) for p in s.parameters()] == ids
                with torch.no_grad():
                    out = _forward(s, sample, dtype)
                assert [o.dtype for o in out] == [dtype] * len(out)
                if dtype == torch.float32:  # back from float64 exactly
                    _assert_same_outputs(out, out32)
            _assert_params_are(s.double(), "cpu", torch.float64)
            _assert_params_are(s.float(), "cpu", torch.float32)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


@pytest.mark.parametrize(("module_name", "variant"), _swap_cases())
def test_meta_and_to_empty(module_name, variant):
    """Built and swapped on the meta device (shape-only forward), then to_empty(device="cpu") and a
    state_dict load give the same outputs as a swap of the loaded float module."""
    for _, sample in _some_samples(module_name, 2):
        c = sample.constructor_input
        with torch.device("meta"):
            m = MODULE_CLASSES[module_name](*c.args, **c.kwargs)
        s = _swapped(m, variant)
        _assert_params_are(s, "meta", torch.float32)
        original = _build(module_name, sample, torch.float32, True)
        meta_out = _forward(s, _to_meta(sample))
        assert [o.shape for o in meta_out] == [o.shape for o in _forward(original, sample)]
        assert all(o.is_meta for o in meta_out)

        s.to_empty(device="cpu")
        _assert_params_are(s, "cpu", torch.float32)
        s.load_state_dict(original.state_dict())
        _assert_same_outputs(_forward(s, sample), _forward(_swapped(original, variant), sample))


def _to_meta(sample):
    sample = copy.copy(sample)
    sample.forward_input = copy.copy(sample.forward_input)
    sample.forward_input.args, sample.forward_input.kwargs = tree_map(
        lambda t: t.detach().to("meta").requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t,
        (sample.forward_input.args, sample.forward_input.kwargs),
    )
    return sample


# Deliberate differences from nn.Linear, one row each: variant -> (error class, message pattern, reason).
DOUBLE_BACKWARD_REFUSED = {
    "switchback-memeff": (RuntimeError, "double backward", "saves only the int8 input: no derivative of the "
                          "weight gradient with respect to the input; raises instead of returning zeros"),
    "fp8-tensorwise": (RuntimeError, "double backward", "saves only the fp8 input: the same; raises"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_double_backward_linear(variant):
    """nn.Linear supports double backward (test_modules.py's gradgrad): so must the swapped layer,
    with the second-order gradients within the format's error of fp64, or refuse it loudly."""
    fmt = VARIANTS[variant][0]
    torch.manual_seed(0)
    original = nn.Linear(48, 40)
    s = _swapped(original, variant)
    if variant in DOUBLE_BACKWARD_REFUSED:
        error, pattern, _reason = DOUBLE_BACKWARD_REFUSED[variant]
        x = torch.randn(16, 48, requires_grad=True)
        with pytest.raises(error, match=pattern):  # at create_graph=True already
            (gx,) = torch.autograd.grad(s(x), x, torch.randn(16, 40), create_graph=True)
            torch.autograd.grad(gx, (s.weight,), torch.randn(16, 48))
        return
    results = []
    for m, dtype in ((s, torch.float32), (copy.deepcopy(original).double(), torch.float64)):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(16, 48, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        v = torch.randn(16, 40, generator=g, dtype=torch.float64).to(dtype)
        (gx,) = torch.autograd.grad(m(x), x, v, create_graph=True)
        w = torch.randn(16, 48, generator=g, dtype=torch.float64).to(dtype)
        results.append(torch.autograd.grad(gx, (m.weight,), w))
    for got, ref in zip(*results):
        assert sqnr_db(ref, got) >= SQNR_FLOOR_DB[fmt]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_swapped_attention_is_an_nn_multihead_attention(variant):
    """Drop-in: code that checks isinstance(m, nn.MultiheadAttention) still finds the swapped module."""
    s = _swapped(nn.MultiheadAttention(8, 2), variant)
    assert isinstance(s, nn.MultiheadAttention) and isinstance(s, LowbitMultiheadAttention)
