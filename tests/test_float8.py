"""Float8Linear's outputs and gradients against an fp64 reference written from DESIGN.md's rule."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.float8 import ops as fp8_ops
from lowbit.float8.config import Float8Config
from lowbit.float8.functional import float8_linear
from lowbit.nn import Float8Linear, LowbitMultiheadAttention
from tests.fp8_reference import fake_fp8, float8_linear_ref, round_fp8
from tests.reference import sqnr_db

RECIPES = ["tensorwise", "switchback"]
CPU_SCALED_MM = fp8_ops.fp8_matmul_unavailable_reason("cpu") is None
# simulate=False on the CPU runs torch's reference _scaled_mm: the real path's padding, layouts and
# scale shapes, without a GPU.
SIMULATE = [True, pytest.param(False, marks=pytest.mark.skipif(not CPU_SCALED_MM, reason="no CPU _scaled_mm"))]
NAMES = ("out", "grad_input", "grad_weight", "grad_bias")


def make(m=37, k=56, n=72, dtype=torch.float32):
    x = torch.randn(m, k, dtype=dtype)
    w = nn.Linear(k, n).weight.detach().to(dtype)
    b = torch.randn(n, dtype=dtype) * 0.1
    g = torch.randn(m, n, dtype=dtype)
    return x, w, b, g


def run_layer(x, w, b, g, config):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    out = float8_linear(x, w, b, config=config)
    out.backward(g)
    return out, x.grad, w.grad, b.grad


def test_cast_lands_on_the_fp8_grid():
    """q * scale_inv equals the reference's fp8 value for every element, both formats, both groupings."""
    # Magnitudes over 12 decades per row: normals, subnormals and values that flush to zero.
    x = torch.randn(64, 96) * 10.0 ** torch.empty(64, 96).uniform_(-10, 2)
    for fmt, dtype in (("e4m3", fp8_ops.E4M3), ("e5m2", fp8_ops.E5M2)):
        for dim in (None, 1):
            q, scale_inv = fp8_ops.to_float8(x, dtype, rowwise=dim == 1)
            assert q.dtype == dtype and scale_inv.dtype == torch.float32
            assert scale_inv.shape == (() if dim is None else (64, 1))
            got = q.double() * scale_inv.double()
            ref = fake_fp8(x, fmt, dim)
            # Same fp8 values; dequantized as q * fp32(1 / scale) against q / scale: 2**-24 apart at most.
            assert torch.allclose(got, ref, rtol=2**-23, atol=0), f"{fmt} dim={dim}"


@pytest.mark.parametrize("simulate", SIMULATE)
@pytest.mark.parametrize("recipe", RECIPES)
def test_matches_fp64_reference(recipe, simulate):
    x, w, b, g = make()
    got = run_layer(x, w, b, g, Float8Config(recipe=recipe, simulate=simulate))
    ref = float8_linear_ref(x, w, b, g, recipe)
    # The real path's row-wise GEMMs write bfloat16 (see lowbit.float8.ops): about 50 dB then.
    floor = 45 if (not simulate and recipe == "switchback") else 50
    for name, r, y in zip(NAMES, ref, got):
        assert y.dtype == torch.float32
        assert sqnr_db(r, y) >= floor, f"{recipe} {name}: {sqnr_db(r, y):.1f} dB"


@pytest.mark.parametrize("recipe", RECIPES)
def test_close_to_exact_linear(recipe):
    """fp8 error alone on N(0, 1) inputs and nn.Linear's init (e4m3 ~ 30 dB, e5m2 ~ 25 dB per cast)."""
    x, w, b, g = make(m=64, k=96, n=80)
    out, gx, gw, _ = run_layer(x, w, b, g, Float8Config(recipe=recipe))
    xd, wd, gd = x.double(), w.double(), g.double()
    assert sqnr_db(xd @ wd.T + b.double(), out) >= 25
    assert sqnr_db(gd @ wd, gx) >= 20
    # grad_weight: fp8 (e5m2 x e4m3) for tensorwise, exact fp32 math for switchback.
    assert sqnr_db(gd.T @ xd, gw) >= (20 if recipe == "tensorwise" else 100)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(recipe, dtype):
    x, w, b, g = make(dtype=dtype)
    got = run_layer(x, w, b, g, Float8Config(recipe=recipe, simulate=True))
    ref = float8_linear_ref(x, w, b, g, recipe)
    floor = 45 if dtype == torch.bfloat16 else 50  # one rounding to the output dtype
    for name, r, y in zip(NAMES, ref, got):
        assert y.dtype == dtype
        assert sqnr_db(r, y) >= floor, f"{recipe} {dtype} {name}: {sqnr_db(r, y):.1f} dB"


def test_autocast_bf16():
    x, w, b, g = make()
    layer = Float8Linear(56, 72, recipe="switchback")
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(xg)
    assert out.dtype == torch.bfloat16
    out.backward(g.bfloat16())
    assert layer.weight.grad.dtype == torch.float32 and xg.grad.dtype == torch.float32
    ref = float8_linear_ref(x.bfloat16(), w.bfloat16(), b.bfloat16(), g.bfloat16(), "switchback")
    assert sqnr_db(ref[0], out) >= 45
    assert sqnr_db(ref[2], layer.weight.grad) >= 45


@pytest.mark.parametrize("simulate", SIMULATE)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_saturating_cast(fmt, simulate):
    dtype = fp8_ops.E4M3 if fmt == "e4m3" else fp8_ops.E5M2
    fp8_max = torch.finfo(dtype).max
    # x * (fp8_max / amax) lands above fp8_max in fp32 for many amax values: the clamp catches them.
    amax = torch.empty(4096).uniform_(0.5, 2.0) * 10.0 ** torch.randint(-20, 30, (4096,))
    x = torch.stack([amax, -amax, amax / 3], dim=1)
    q, scale_inv = fp8_ops.to_float8(x, dtype, rowwise=True)
    assert torch.isfinite(q.float()).all() and torch.isfinite(scale_inv).all()
    assert torch.equal(q.float()[:, 0], torch.full((4096,), fp8_max))
    assert torch.equal(q.float()[:, 1], torch.full((4096,), -fp8_max))
    # Huge but finite values, up to fp32's largest: still finite fp8 values and exact at the amax.
    big = torch.tensor([[3.0e38, -1.0e38, 1.0], [1e30, 2.0, -5e29]])
    q, scale_inv = fp8_ops.to_float8(big, dtype, rowwise=False)
    assert torch.isfinite(q.float()).all() and q.float().abs().max() == fp8_max
    assert torch.allclose(q.float()[0, 0] * scale_inv, torch.tensor(3.0e38), rtol=1e-6)
    # Through the layer: gradients far beyond e5m2's 57344 before scaling give finite results.
    x, w, b, g = make()
    out, gx, _, _ = run_layer(x * 1e6, w, b, g * 1e30, Float8Config(recipe="switchback", simulate=simulate))
    assert torch.isfinite(out).all() and torch.isfinite(gx).all()
    ref = float8_linear_ref(x * 1e6, w, b, g * 1e30, "switchback")
    assert sqnr_db(ref[1], gx) >= 45


@pytest.mark.parametrize("simulate", SIMULATE)
@pytest.mark.parametrize("recipe", RECIPES)
def test_zero_tensors(recipe, simulate):
    config = Float8Config(recipe=recipe, simulate=simulate)
    x, w, b, g = make()
    zero_x, zero_w, zero_g = torch.zeros_like(x), torch.zeros_like(w), torch.zeros_like(g)
    out, gx, gw, gb = run_layer(zero_x, w, b, g, config)
    assert torch.equal(out, b.expand_as(out)) and torch.equal(gw, torch.zeros_like(w))
    assert torch.isfinite(gx).all()
    out, gx, _, _ = run_layer(x, zero_w, b, g, config)
    assert torch.equal(out, b.expand_as(out)) and torch.equal(gx, torch.zeros_like(gx))
    out, gx, gw, gb = run_layer(x, w, b, zero_g, config)
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gw, torch.zeros_like(gw))
    assert torch.equal(gb, torch.zeros_like(b))
    # One zero row among others: that row's output is the bias; nothing is NaN.
    x[3] = 0
    out, gx, gw, _ = run_layer(x, w, b, g, config)
    assert torch.allclose(out[3], b) and torch.isfinite(out).all() and torch.isfinite(gw).all()


def test_empty_batch():
    _, w, b, _ = make()
    for recipe in RECIPES:
        out, gx, gw, gb = run_layer(torch.zeros(0, 56), w, b, torch.zeros(0, 72), Float8Config(recipe=recipe))
        assert out.shape == (0, 72) and gx.shape == (0, 56)
        assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("simulate", SIMULATE)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_values(bad, simulate):
    """A row-scaled group poisons its own row; a tensor-scaled one the whole result. Never silently finite."""
    x, w, b, g = make()
    x[5, 7] = bad
    g[9, 2] = bad
    out, gx, gw, _ = run_layer(x, w, b, g, Float8Config(recipe="switchback", simulate=simulate))
    assert out[5].isnan().all() and torch.isfinite(torch.cat([out[:5], out[6:]])).all()
    assert gx[9].isnan().all() and torch.isfinite(torch.cat([gx[:9], gx[10:]])).all()
    keep = [i for i in range(37) if i not in (5, 9)]
    ref = float8_linear_ref(x[keep], w, b, g[keep], "switchback")
    assert sqnr_db(ref[0], out[keep]) >= 45

    out, gx, gw, _ = run_layer(x, w, b, g, Float8Config(recipe="tensorwise", simulate=simulate))
    assert out.isnan().all() and gx.isnan().all() and gw.isnan().all()
    # Only the output the bad tensor feeds is poisoned: a finite g gives a finite grad_input.
    _, gx, _, _ = run_layer(x, w, b, torch.randn(37, 72), Float8Config(recipe="tensorwise", simulate=simulate))
    assert torch.isfinite(gx).all()


def test_leading_dims_non_contiguous_and_no_grad():
    _, w, b, g = make(m=2 * 3 * 5)
    x_nc = torch.randn(56, 2, 3, 5).permute(1, 2, 3, 0)
    assert not x_nc.is_contiguous()
    for recipe in RECIPES:
        config = Float8Config(recipe=recipe)
        out, gx, gw, _ = run_layer(x_nc, w, b, g.reshape(2, 3, 5, 72), config)
        assert out.shape == (2, 3, 5, 72) and gx.shape == x_nc.shape
        ref = float8_linear_ref(x_nc.reshape(-1, 56), w, b, g, recipe)
        for r, y in zip(ref[:3], (out.reshape(-1, 72), gx.reshape(-1, 56), gw)):
            assert sqnr_db(r, y) >= 50
        with torch.no_grad():
            assert torch.equal(float8_linear(x_nc, w, b, config=config), out.detach())


def test_gradients_only_where_required():
    layer = Float8Linear(56, 72, recipe="tensorwise")
    layer.weight.requires_grad_(False)
    x = torch.randn(5, 56, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None and x.grad is not None
    layer.requires_grad_(False)
    assert layer(torch.randn(5, 56)).grad_fn is None


def test_layer_options_and_repr():
    layer = Float8Linear(8, 4, recipe="switchback", simulate=True)
    assert isinstance(layer, nn.Linear) and isinstance(layer, lowbit.nn.LowbitLinear)
    assert "recipe='switchback'" in repr(layer) and "simulate=True" in repr(layer)
    assert layer.config == Float8Config(recipe="switchback", simulate=True)
    with pytest.raises(ValueError, match="recipe must be one of"):
        Float8Linear(8, 4, recipe="rowwise")
    with pytest.raises(ValueError, match="simulate must be None, True or False"):
        Float8Linear(8, 4, simulate="yes")
    with pytest.raises(ValueError, match="simulate must be None, True or False"):
        Float8Config(simulate=1)
    with pytest.raises(AttributeError):
        layer.config.recipe = "tensorwise"  # frozen


def test_bad_inputs_get_clear_errors(monkeypatch):
    layer = Float8Linear(8, 4)
    with pytest.raises(ValueError, match="0-dim"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        layer(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="weight is torch.float32"):
        layer(torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="has 7 features, the layer expects 8"):
        layer(torch.randn(2, 7))
    with pytest.raises(ValueError, match="one device"):
        layer(torch.randn(2, 8, device="meta"))
    # simulate=False where there is no fp8 matmul: a clear error that names the fix.
    meta_layer = Float8Linear(8, 4, simulate=False, device="meta")
    with pytest.raises(RuntimeError, match="simulate=True"):
        meta_layer(torch.randn(2, 8, device="meta"))
    monkeypatch.setattr(fp8_ops, "fp8_matmul_unavailable_reason", lambda device: "compute capability 8.0")
    with pytest.raises(RuntimeError, match=r"compute capability 8.0.*simulate=None"):
        Float8Linear(8, 4, simulate=False)(torch.randn(2, 8))
    # simulate=None falls back to the simulation, without an error.
    assert Float8Linear(8, 4)(torch.randn(2, 8)).shape == (2, 4)


def test_simulate_none_picks_the_simulation_on_cpu():
    assert not fp8_ops.use_scaled_mm(None, torch.device("cpu"))
    assert not fp8_ops.use_scaled_mm(True, torch.device("cpu"))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("name", ["fp8-tensorwise", "fp8-switchback"])
def test_swap_and_unswap(name):
    model = Tiny()
    x = torch.randn(2, 5, 32)
    ref = model(x).detach()
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}

    lowbit.swap(model, name, filter_fn=lowbit.ALL, simulate=True)
    assert isinstance(model.fc1, Float8Linear) and isinstance(model.attn, LowbitMultiheadAttention)
    assert isinstance(model.attn.out_proj, Float8Linear)
    assert model.fc1.config.recipe == name.removeprefix("fp8-")
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    out = model(x)
    assert sqnr_db(ref, out) >= 20
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    lowbit.unswap(model)
    assert type(model.fc1) is nn.Linear and type(model.attn) is nn.MultiheadAttention
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.allclose(model(x), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_real_fp8_agrees_with_simulation_on_gpu(recipe, dtype):
    """torch._scaled_mm on fp8 tensor cores vs the simulation: SQNR >= 45 dB for every gemm.

    Ragged shapes (K, N not multiples of 16) take the padding path.
    """
    reason = fp8_ops.fp8_matmul_unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(reason)
    assert fp8_ops.use_scaled_mm(None, torch.device("cuda"))  # simulate=None picks real fp8 here
    x, w, b, g = (t.cuda() for t in make(m=300, k=200, n=136, dtype=dtype))
    real = run_layer(x, w, b, g, Float8Config(recipe=recipe, simulate=False))
    sim = run_layer(x, w, b, g, Float8Config(recipe=recipe, simulate=True))
    ref = float8_linear_ref(x, w, b, g, recipe)
    for name, r, s, y in zip(NAMES, ref, sim, real):
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert sqnr_db(s, y) >= 45, f"{recipe} {name}: real vs simulated {sqnr_db(s, y):.1f} dB"
        assert sqnr_db(r, y) >= 40, f"{recipe} {name}: real vs fp64 reference {sqnr_db(r, y):.1f} dB"
    # inf/NaN and all-zero groups behave as in the simulation.
    x[5, 7] = float("inf")
    x[6] = 0
    out = run_layer(x, w, b, g, Float8Config(recipe=recipe, simulate=False))[0]
    if recipe == "switchback":
        assert out[5].isnan().all() and torch.isfinite(out[6:]).all()
        assert torch.allclose(out[6].float(), b.float(), atol=1e-2)
    else:
        assert out.isnan().all()


def test_round_fp8_reference_against_known_values():
    """The reference's own grid: a few values checked by hand."""
    y = torch.tensor([0.0, 1.0, 1.0625, 1.1875, 448.0, 500.0, -1e9, 2.0**-9, 2.0**-10, 3 * 2.0**-10])
    assert round_fp8(y, "e4m3").tolist() == [0.0, 1.0, 1.0, 1.25, 448.0, 448.0, -448.0, 2.0**-9, 0.0, 2.0**-8]
    assert round_fp8(torch.tensor([1.125, 1.375, 6e4, 2.0**-16, 2.0**-17]), "e5m2").tolist() == [
        1.0, 1.5, 57344.0, 2.0**-16, 0.0
    ]


@pytest.mark.parametrize("recipe", RECIPES)
def test_torch_compile_fullgraph(recipe):
    """The layer traces without graph breaks (aot_eager: the trace, not inductor's code generation)."""
    torch._dynamo.reset()
    layer = Float8Linear(32, 48, recipe=recipe)
    x = torch.randn(4, 5, 32, requires_grad=True)
    ref = layer(x)
    ref.sum().backward()
    grad_ref, x.grad = x.grad, None
    out = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    out.sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, grad_ref)


def test_the_backend_switch_forces_the_fp8_simulation(monkeypatch):
    from lowbit.float8 import ops as fp8_ops

    monkeypatch.setattr(fp8_ops, "fp8_matmul_unavailable_reason", lambda device: None)  # as on an H100
    cuda = torch.device("cuda")
    assert fp8_ops.use_scaled_mm(None, cuda)
    with lowbit.use_backend("torch"):
        assert not fp8_ops.use_scaled_mm(None, cuda)
        assert fp8_ops.use_scaled_mm(False, cuda)  # asked for by name


def test_recipes_are_presets_over_per_operand_scaling():
    def operands(config):
        return config.activation_scaling, config.weight_scaling, config.grad_weight

    assert operands(Float8Config(recipe="tensorwise")) == ("tensor", "tensor", "fp8")
    assert operands(Float8Config(recipe="switchback")) == ("row", "tensor", "high")


def test_tensorwise_backward_casts_the_gradient_to_e5m2_once(monkeypatch):
    """grad_input and grad_weight both need g in e5m2 with one tensor scale: one cast serves both."""
    from lowbit.float8 import ops as fp8_ops_module

    casts = []
    to_float8 = fp8_ops_module.to_float8

    def record(x, fp8_dtype, *, rowwise):
        casts.append((fp8_dtype, rowwise, tuple(x.shape)))
        return to_float8(x, fp8_dtype, rowwise=rowwise)

    monkeypatch.setattr(fp8_ops_module, "to_float8", record)
    layer = Float8Linear(24, 40, recipe="tensorwise", simulate=True)
    x = torch.randn(7, 24, requires_grad=True)
    out = layer(x)
    casts.clear()
    out.square().sum().backward()
    assert [c for c in casts if c[0] == torch.float8_e5m2] == [(torch.float8_e5m2, False, (7, 40))]
