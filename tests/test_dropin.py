"""What people do with an nn.Linear every day, done to lowbit's layers: each either gives nn.Linear's
answer within the format's error or a clear error (issue "Drop-in means drop-in").

References are nn.Linear / torch.func in float64 on the same Parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

import lowbit
from lowbit.mx.config import FORMATS as BLOCK_FORMATS
from lowbit.nn import BlockScaledLinear, Float8Linear, SwitchBackLinear
from lowbit.registry import layer_spec


def _builder(name):
    spec = layer_spec(name)
    extra = {"simulate": True} if issubclass(spec.cls, Float8Linear) else {}  # the fp8 rule, on any device
    return lambda i, o, **kw: spec.cls(i, o, **spec.build_kwargs(**extra, **kw))


# Every registered layer name: a new format is tested here without being listed.
VARIANTS = {name: _builder(name) for name in lowbit.layer_names()}
# Block-scaled formats by element: e5m2 and e2m1 hold 1 and 2 mantissa bits fewer than e4m3 (~6 dB a bit).
_BLOCK_FLOOR_DB = {"e4m3": 22, "e5m2": 17, "e2m1": 11}


def _floor_db(name: str) -> int:
    """Forward SQNR floor at these small, random sizes (int8 ~40 dB, fp8 e4m3 ~30 dB, e2m1 ~16 dB)."""
    spec = layer_spec(name)
    if issubclass(spec.cls, BlockScaledLinear):
        return _BLOCK_FLOOR_DB[BLOCK_FORMATS[spec.options["format"]].element]
    return 22 if issubclass(spec.cls, Float8Linear) else 33


FLOOR_DB = {name: _floor_db(name) for name in VARIANTS}


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return (20 * torch.log10(ref.norm() / (ref - x).norm().clamp_min(1e-300))).item()


def exact(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), layer.weight.double(), layer.bias.double() if layer.bias is not None else None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- No stale weights: every way a weight changes without an optimizer step -------------------


def _eval_layer(name="switchback"):
    return VARIANTS[name](40, 24).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_functional_call_with_new_weights_is_never_stale(name):
    layer = _eval_layer(name)
    x = torch.randn(9, 40)
    with torch.no_grad():
        layer(x)  # anything a first call could cache
        for _ in range(7):
            params = {"weight": torch.randn(24, 40), "bias": torch.randn(24)}
            out = functional_call(layer, params, (x,))
            ref = F.linear(x.double(), params["weight"].double(), params["bias"].double())
            assert sqnr_db(ref, out) >= FLOOR_DB[name]


@pytest.mark.parametrize("write", ["data_copy", "vector_to_parameters", "load_state_dict_assign", "copy_", "data_set"])
def test_eval_no_grad_sees_every_weight_write(write):
    layer = _eval_layer()
    x = torch.randn(9, 40)
    with torch.no_grad():
        layer(x)
        new = torch.randn(24, 40)
        if write == "data_copy":
            layer.weight.data.copy_(new)
        elif write == "vector_to_parameters":
            nn.utils.vector_to_parameters(torch.cat([new.flatten(), layer.bias.flatten()]), layer.parameters())
        elif write == "load_state_dict_assign":
            layer.load_state_dict({"weight": new.clone(), "bias": layer.bias.clone()}, assign=True)
        elif write == "copy_":
            layer.weight.copy_(new)
        else:
            layer.weight.data = new.clone()
        assert sqnr_db(exact(layer, x), layer(x)) >= FLOOR_DB["switchback"]


def test_ema_copy_in_eval_follows_the_model():
    """timm's ModelEmaV2 writes the EMA weights through .data-style in-place ops under no_grad."""
    model = nn.Sequential(nn.Linear(40, 24))
    lowbit.swap(model, filter_fn=lowbit.ALL)
    ema = copy.deepcopy(model).eval()
    x = torch.randn(9, 40)
    for _ in range(3):
        with torch.no_grad():
            ema(x)
            for e, m in zip(ema.parameters(), model.parameters()):
                e.data.mul_(0.5).add_(torch.randn_like(m) * 0.5)
            assert sqnr_db(exact(ema[0], x), ema(x)) >= FLOOR_DB["switchback"]


def test_frozen_weight_is_reused_and_dropped_on_every_visible_change():
    layer = _eval_layer()
    x = torch.randn(9, 40)
    layer.freeze_weight()
    assert layer.weight_frozen
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)
        layer.weight.mul_(-1)  # a version bump: the copy is no longer used
        assert not layer.weight_frozen
        assert sqnr_db(exact(layer, x), layer(x)) >= FLOOR_DB["switchback"]
    layer.freeze_weight()
    layer.weight.data = torch.randn(24, 40)  # new storage
    assert not layer.weight_frozen
    layer.freeze_weight()
    layer.train()
    assert not layer.weight_frozen and layer._frozen_weight is None
    # functional_call passes other tensors: the frozen copy of the layer's own weight is never used.
    layer.eval().freeze_weight()
    params = {"weight": torch.randn(24, 40), "bias": layer.bias}
    with torch.no_grad():
        out = functional_call(layer, params, (x,))
    assert sqnr_db(F.linear(x.double(), params["weight"].double(), layer.bias.double()), out) >= 33


def test_frozen_weight_holds_its_storage_so_no_address_is_reused():
    layer = _eval_layer().freeze_weight()
    storage = layer.weight.untyped_storage().data_ptr()
    layer.weight.data = torch.randn(24, 40)
    # Were the old storage freed, a same-sized allocation could take its address; it is held.
    others = [torch.randn(24, 40) for _ in range(8)]
    assert all(t.untyped_storage().data_ptr() != storage for t in others)
    assert not layer.weight_frozen


# --- Double backward -----------------------------------------------------------------------------


def _second_order(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A gradient penalty: d/d(x, w, b) of |d(sum(out**2))/dx|^2."""
    x = x.clone().requires_grad_()
    out = layer(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), [x, *layer.parameters()])


@pytest.mark.parametrize("name", ["switchback", "switchback-row", "llm-int8", "fp8-switchback"])
def test_double_backward_matches_nn_linear(name):
    layer = VARIANTS[name](40, 24)
    ref_layer = nn.Linear(40, 24).double()
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(9, 40)
    got = _second_order(layer, x)
    ref = _second_order(ref_layer, x.double())
    floor = 18 if name.startswith("fp8") else 30  # e5m2 gradients: 2 mantissa bits, chained 3 deep
    for r, g in zip(ref, got):
        assert sqnr_db(r, g) >= floor, (name, [sqnr_db(r, g) for r, g in zip(ref, got)])


@pytest.mark.parametrize("name", ["switchback-memeff", "fp8-tensorwise"])
def test_double_backward_without_the_input_raises_at_the_first_backward(name):
    layer = VARIANTS[name](40, 24)
    x = torch.randn(9, 40, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(layer(x).square().sum(), [x, layer.weight], create_graph=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_memeff_weight_gradient_is_differentiable_in_g(backend):
    """Where x needs no gradient, switchback-memeff's weight gradient g.T @ dequantized(x) has an exact
    derivative in g, and a penalty on it (meta-learning, gradient penalties on parameters) must reach
    the layers after it. The Triton GEMM's output carries no graph: it must not be the one taken then."""
    from tests.kernels._utils import DEVICE

    def penalty_grad(first, second, x):
        loss = second(first(x)).square().sum()
        (gw,) = torch.autograd.grad(loss, first.weight, create_graph=True)
        return torch.autograd.grad(gw.square().sum(), second.weight)[0]

    layer = SwitchBackLinear(40, 24, mem_efficient=True, device=DEVICE)
    after = nn.Linear(24, 8, device=DEVICE)
    ref_layer, ref_after = nn.Linear(40, 24).double(), nn.Linear(24, 8).double()
    ref_layer.load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})
    ref_after.load_state_dict({k: v.cpu() for k, v in after.state_dict().items()})
    x = torch.randn(9, 40)
    with lowbit.use_backend(backend):
        got = penalty_grad(layer, after, x.to(DEVICE))
    ref = penalty_grad(ref_layer, ref_after, x.double())
    assert sqnr_db(ref, got.cpu()) >= 25


# --- torch.func --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_torch_func_grad_vmap_and_jacrev(name):
    layer = VARIANTS[name](12, 6)
    ref_layer = nn.Linear(12, 6).double()
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(5, 12)
    floor = FLOOR_DB[name] - 8  # single small rows: fewer elements to average the error over

    def loss(module, params, x):
        return functional_call(module, params, (x,)).square().sum()

    params = dict(layer.named_parameters())
    ref_params = dict(ref_layer.named_parameters())
    got = grad(loss, argnums=1)(layer, params, x)
    ref = grad(loss, argnums=1)(ref_layer, ref_params, x.double())
    for k in ref:
        assert sqnr_db(ref[k], got[k]) >= floor, k

    # Per-sample gradients: vmap over grad.
    per_sample = vmap(grad(loss, argnums=1), in_dims=(None, None, 0))(layer, params, x[:, None])
    per_sample_ref = vmap(grad(loss, argnums=1), in_dims=(None, None, 0))(ref_layer, ref_params, x[:, None].double())
    for k in per_sample_ref:
        assert per_sample[k].shape == per_sample_ref[k].shape
        assert sqnr_db(per_sample_ref[k], per_sample[k]) >= floor, k

    jac = jacrev(layer)(x[0])
    assert jac.shape == (6, 12)
    assert sqnr_db(ref_layer.weight, jac) >= floor  # d(out)/d(x) of a linear is its weight


@pytest.mark.parametrize("grad_weight", ["high", "int8"])
def test_torch_func_weight_gradients_of_memeff_on_the_triton_backend(grad_weight):
    """switchback-memeff's weight gradient reads its int8 x back (dequantized in a Triton GEMM, or by a
    Triton kernel for the int8 GEMM); under torch.func those saved tensors are transform wrappers,
    which no Triton kernel can read: grad and vmap(grad) with respect to the parameters must still
    give nn.Linear's answer (x needs no gradient, so nothing asks for a derivative of int8 x)."""
    from tests.kernels._utils import DEVICE

    layer = SwitchBackLinear(40, 24, mem_efficient=True, grad_weight=grad_weight, device=DEVICE)
    ref_layer = nn.Linear(40, 24).double()
    ref_layer.load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})
    x = torch.randn(7, 40)

    def loss(module, params, x):
        return functional_call(module, params, (x,)).square().sum()

    params, ref_params = dict(layer.named_parameters()), dict(ref_layer.named_parameters())
    floor = FLOOR_DB["switchback-memeff"] - 8
    with lowbit.use_backend("triton"):
        got = grad(loss, argnums=1)(layer, params, x.to(DEVICE))
        per_sample = vmap(grad(loss, argnums=1), in_dims=(None, None, 0))(layer, params, x[:, None].to(DEVICE))
    ref = grad(loss, argnums=1)(ref_layer, ref_params, x.double())
    per_sample_ref = vmap(grad(loss, argnums=1), in_dims=(None, None, 0))(ref_layer, ref_params, x[:, None].double())
    for k in ref:
        assert sqnr_db(ref[k], got[k].cpu()) >= floor, k
        assert per_sample[k].shape == per_sample_ref[k].shape
        assert sqnr_db(per_sample_ref[k], per_sample[k].cpu()) >= floor, k


def test_ensemble_with_stack_module_state_and_vmap():
    members = [SwitchBackLinear(12, 6) for _ in range(3)]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(4, 12)

    def run(p, b, x):
        return functional_call(base, (p, b), (x,))

    out = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    assert out.shape == (3, 4, 6)
    for i, m in enumerate(members):
        assert sqnr_db(exact(m, x), out[i]) >= 30
    out.square().sum().backward()
    for i, m in enumerate(members):
        ref = 2 * exact(m, x).t() @ x.double()  # d(sum(out**2))/dw of an exact linear
        assert sqnr_db(ref, params["weight"].grad[i]) >= 28


# --- Inputs nn.Linear accepts -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_one_dim_input_empty_batch_and_zero_features(name):
    layer = VARIANTS[name](40, 24)
    x = torch.randn(40, requires_grad=True)
    out = layer(x)
    assert out.shape == (24,)
    out.sum().backward()
    assert x.grad.shape == (40,) and layer.weight.grad.shape == (24, 40)
    assert sqnr_db(exact(layer, x.detach()), out) >= FLOOR_DB[name] - 8

    empty = torch.randn(0, 3, 40, requires_grad=True)
    out = layer(empty)
    assert out.shape == (0, 3, 24)
    out.sum().backward()
    assert empty.grad.shape == empty.shape

    no_features = VARIANTS[name](0, 5)
    ref = nn.Linear(0, 5)
    ref.load_state_dict(no_features.state_dict())
    x0 = torch.randn(3, 0)
    assert torch.equal(no_features(x0), ref(x0))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_float64_is_computed_by_the_rule_and_returned_in_float64(name):
    layer = VARIANTS[name](40, 24, dtype=torch.float64)
    x = torch.randn(9, 40, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.float64
    out.square().sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float64
    assert sqnr_db(exact(layer, x.detach()), out) >= FLOOR_DB[name]


@pytest.mark.parametrize("name", [n for n in VARIANTS if layer_spec(n).cls is SwitchBackLinear])
def test_float64_layers_run_the_triton_kernels_as_the_torch_twins(name):
    """A float64 bias reaches the kernels' fp32 epilogue as fp32 (the kernels take no float64)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on the CPU
    layer = VARIANTS[name](40, 24, dtype=torch.float64).to(device)
    x = torch.randn(9, 40, dtype=torch.float64, device=device)
    results = []
    for backend in ("torch", "triton"):
        with lowbit.use_backend(backend):
            xb = x.clone().requires_grad_()
            out = layer(xb)
            out.square().sum().backward()
            results.append((out.detach(), xb.grad, layer.weight.grad, layer.bias.grad))
            layer.zero_grad(set_to_none=True)
    for want, got in zip(*results):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


# --- K = 1 (torch._int_mm mis-sums a (1, N) int8 view with strides (1, 1) on some versions) ---------


@pytest.mark.parametrize("shape", [(1, 16), (16, 1), (1, 1), (3, 1)])
def test_size_one_layers_are_exact_enough(shape):
    layer = SwitchBackLinear(*shape)
    x = torch.randn(7, shape[0])
    assert sqnr_db(exact(layer, x), layer(x)) >= 30


# --- export and activation checkpointing ------------------------------------------------------------


def test_torch_export_of_a_swapped_model_and_attention():
    model = lowbit.swap(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), filter_fn=lowbit.ALL)
    x = torch.randn(3, 8)
    exported = torch.export.export(model, (x,))
    assert torch.equal(exported.module()(x), model(x))

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.attn = lowbit.swap(nn.ModuleList([attn]), filter_fn=lowbit.ALL)[0]

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    module = SelfAttention()
    x = torch.randn(2, 5, 16)
    assert torch.equal(torch.export.export(module, (x,)).module()(x), module(x))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_activation_checkpointing_gives_the_same_gradients(name):
    layer = VARIANTS[name](40, 24)
    x = torch.randn(9, 40, requires_grad=True)
    layer(x).square().sum().backward()
    plain = (x.grad.clone(), layer.weight.grad.clone())
    x.grad = layer.weight.grad = layer.bias.grad = None
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    assert torch.equal(x.grad, plain[0]) and torch.equal(layer.weight.grad, plain[1])
