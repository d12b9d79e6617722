"""The block-scaled formats (lowbit.mx) against tests/mx_reference.py, an fp64 rule written from the
formats' definitions: casts, zeros, saturation, short blocks, inf/NaN, the three GEMMs, dtypes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.mx import BlockConfig, block_linear
from lowbit.mx import ops as block_ops
from lowbit.nn import BlockScaledLinear
from tests.mx_reference import block_linear_ref, element_values, quantize_ref, round_ref, weight_rows

NAMES = ["mxfp8", "mxfp8-e5m2", "mxfp4", "nvfp4", "fp8-blockwise"]
ELEMENT = {"mxfp8": "e4m3", "mxfp8-e5m2": "e5m2", "mxfp4": "e2m1", "nvfp4": "e2m1", "fp8-blockwise": "e4m3"}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return (20 * torch.log10(ref.norm() / (ref - x).norm().clamp_min(1e-300))).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spread(shape, dtype=torch.float32) -> torch.Tensor:
    """Random values whose rows and blocks differ in magnitude by orders (so scales differ)."""
    x = torch.randn(shape) * torch.exp2(torch.randint(-12, 12, (shape[0], 1)).float())
    return (x * torch.exp2(torch.randint(-3, 4, shape).float())).to(dtype)


def dequantized(x: torch.Tensor, fmt: str, weight: bool = False) -> torch.Tensor:
    x_hat, tensor_scale = block_ops.quantize(x, fmt, weight=weight)
    return x_hat.double() * tensor_scale.double()


# --- The reference itself, against the definitions ---------------------------------------------


def test_reference_element_values_are_the_formats():
    values, _ = element_values("e2m1")
    assert values.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert element_values("e4m3")[0].max() == 448 and element_values("e5m2")[0].max() == 57344
    # e4m3 and e5m2 agree with torch's own dtypes on every finite value.
    for element, dtype in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        codes = torch.arange(128, dtype=torch.uint8).view(dtype).double()
        assert torch.equal(element_values(element)[0], codes[torch.isfinite(codes)])


# --- Element rounding ------------------------------------------------------------------------------


@pytest.mark.parametrize("element", ["e4m3", "e5m2", "e2m1"])
def test_round_element_is_nearest_even_and_saturating(element):
    values, _ = element_values(element)
    mids = (values[1:] + values[:-1]) / 2  # every tie
    fmax = values.max().item()
    y = torch.cat([
        values, -values, mids, -mids, values * 1.1, mids * 0.999,
        torch.randn(2000) * fmax / 3, torch.tensor([fmax * 1.01, fmax * 4, -fmax * 1e3, 1e-30, 0.0]),
    ]).float()
    got = block_ops.round_element(y, element)
    assert torch.equal(got.double(), round_ref(y, element))
    assert got.abs().max() == fmax
    assert torch.isnan(block_ops.round_element(torch.tensor([torch.nan]), element)).all()


# --- The casts, format by format -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 64), (7, 40), (3, 300), (1, 1)])
@pytest.mark.parametrize("fmt", NAMES)
def test_quantize_matches_the_reference(fmt, shape, dtype):
    x = spread(shape, dtype)
    got, ref = dequantized(x, fmt), quantize_ref(x.float(), fmt)
    if fmt.startswith("mx"):
        assert torch.equal(got, ref)  # power-of-two scales: exact
    else:  # one fp32 multiply by an fp32 scale
        torch.testing.assert_close(got, ref, rtol=2**-23, atol=0)


@pytest.mark.parametrize("fmt", ["fp8-blockwise", "mxfp8", "nvfp4"])
def test_weight_blocks(fmt):
    w = spread((200, 300))
    got = dequantized(w, fmt, weight=True)
    torch.testing.assert_close(got, quantize_ref(w, fmt, weight_rows=weight_rows(fmt)), rtol=2**-23, atol=0)
    if fmt == "fp8-blockwise":  # 128x128 blocks: one scale for rows 0..127, so not the per-row tiles
        assert not torch.equal(got, dequantized(w, fmt))


@pytest.mark.parametrize("fmt", NAMES)
def test_zero_blocks_stay_zero(fmt):
    x = spread((4, 300))
    x[1] = 0  # a zero row
    x[2, 128:256] = 0  # zero blocks inside a row (128 is a multiple of every block size)
    got = dequantized(x, fmt)
    assert torch.isfinite(got).all()
    assert (got[1] == 0).all() and (got[2, 128:256] == 0).all()
    assert (dequantized(torch.zeros(3, 50), fmt) == 0).all()


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp8-e5m2", "mxfp4"])
def test_mx_saturates_a_block_amax_past_the_element_max(fmt):
    # amax = 1.99 -> scale 2**(0 - emax_elem): 1.99 / scale is past the element's max and saturates.
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 1.99, 0.5
    expect = {"mxfp8": 448 / 2**8, "mxfp8-e5m2": 57344 / 2**15, "mxfp4": 6 / 2**2}[fmt]
    got = dequantized(x, fmt)
    assert got[0, 0] == expect  # 1.75, 1.75, 1.5
    assert got[0, 1] == 0.5


def test_hand_computed_values():
    x = torch.tensor([[3.0, 1.0, 0.3, -2.2] + [0.0] * 28])
    # mxfp4: amax 3 -> scale 2**(1 - 2) = 0.5; x / 0.5 = 6, 2, 0.6, -4.4 -> 6, 2, 0.5, -4.
    assert dequantized(x, "mxfp4")[0, :4].tolist() == [3.0, 1.0, 0.25, -2.0]
    # nvfp4, one block: s_t = 3 / 2688, block scale (3 / 6) / s_t = 448 -> step 3 / 6 = 0.5, as above.
    torch.testing.assert_close(dequantized(x, "nvfp4")[0, :4], torch.tensor([3.0, 1.0, 0.25, -2.0]).double())


@pytest.mark.parametrize("fmt", NAMES)
def test_a_short_last_block_is_the_zero_padded_one(fmt):
    x = spread((6, 40))
    padded = F.pad(x, (0, 88))  # 128 columns: a multiple of every block
    torch.testing.assert_close(dequantized(x, fmt), dequantized(padded, fmt)[:, :40], rtol=0, atol=0)
    # And through the layer: K = 40 equals K = 128 with zero columns in x and w.
    w = spread((24, 40))
    out = block_linear(x, w, config=BlockConfig(fmt))
    torch.testing.assert_close(out, block_linear(padded, F.pad(w, (0, 88)), config=BlockConfig(fmt)), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [torch.inf, -torch.inf, torch.nan])
@pytest.mark.parametrize("fmt", NAMES)
def test_inf_and_nan_poison_their_block(fmt, bad):
    x = spread((3, 300))
    x[0, 5] = bad
    got = dequantized(x, fmt)
    if fmt == "nvfp4":  # one tensor scale: the whole tensor
        assert torch.isnan(got).all()
    else:
        block = {"fp8-blockwise": 128}.get(fmt, 32)
        assert torch.isnan(got[0, :block]).all()
        assert torch.isfinite(got[0, block:]).all() and torch.isfinite(got[1:]).all()
    assert torch.equal(torch.isnan(got), torch.isnan(quantize_ref(x, fmt)))
    # Through the layer: NaN in the outputs that read the block, nothing else.
    out = block_linear(x, spread((8, 300)), config=BlockConfig(fmt))
    assert torch.isnan(out[0]).all()
    if fmt == "nvfp4":
        assert torch.isnan(out).all()
    else:
        assert torch.isfinite(out[1:]).all()


# --- The layer: the three GEMMs against the fp64 rule ----------------------------------------------

# out / grad floors by output dtype: fp32 is the rule up to summation order; 16-bit adds one rounding.
RULE_FLOOR_DB = {torch.float32: 110, torch.float16: 60, torch.bfloat16: 45}


@pytest.mark.parametrize("grad_weight", ["high", "format"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", NAMES)
def test_layer_matches_the_rule(fmt, dtype, grad_weight):
    m, k, n = 20, 136, 72  # K and N are not multiples of 32 or 128
    layer = BlockScaledLinear(k, n, format=fmt, grad_weight=grad_weight, dtype=dtype)
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    g = torch.randn(m, n, dtype=dtype)
    out = layer(x)
    out.backward(g)
    assert out.dtype == x.grad.dtype == layer.weight.grad.dtype == dtype
    ref = block_linear_ref(x.detach().float(), layer.weight.detach().float(), layer.bias.detach().float(),
                           g.float(), fmt, grad_weight)
    floor = RULE_FLOOR_DB[dtype]
    for name, r, got in zip(("out", "grad_input", "grad_weight", "grad_bias"), ref,
                            (out, x.grad, layer.weight.grad, layer.bias.grad)):
        assert sqnr_db(r, got) >= floor, (name, sqnr_db(r, got))


def test_float64_is_quantized_from_its_float32_rounding():
    layer = BlockScaledLinear(64, 16, format="mxfp4", dtype=torch.float64)
    x = torch.randn(5, 64, dtype=torch.float64)
    out = layer(x)
    assert out.dtype == torch.float64
    ref = block_linear_ref(x.float(), layer.weight.float(), layer.bias.float(), torch.zeros(5, 16), "mxfp4")[0]
    assert sqnr_db(ref, out) >= 110


# SQNR against the exact product on a random (64, 256) x (256, 192) layer; measured (seed 0):
# mxfp8 27.8 / 27.8, mxfp8-e5m2 22.4 / 22.4, mxfp4 16.0 / 15.9, nvfp4 17.5 / 17.4, fp8-blockwise 28.7 / 28.7 dB.
EXACT_FLOOR_DB = {"mxfp8": 26, "mxfp8-e5m2": 21, "mxfp4": 14.5, "nvfp4": 16, "fp8-blockwise": 27}


@pytest.mark.parametrize("fmt", NAMES)
def test_sqnr_against_the_exact_product(fmt):
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(192, 256) / 16
    g = torch.randn(64, 192)
    out = block_linear(x, w, config=BlockConfig(fmt))
    out.backward(g)
    assert sqnr_db(x.detach().double() @ w.double().T, out) >= EXACT_FLOOR_DB[fmt]
    assert sqnr_db(g.double() @ w.double(), x.grad) >= EXACT_FLOOR_DB[fmt]


@pytest.mark.parametrize("fmt", NAMES)
def test_double_backward(fmt):
    layer = BlockScaledLinear(40, 24, format=fmt)
    ref_layer = nn.Linear(40, 24).double()
    ref_layer.load_state_dict(layer.state_dict())

    def second_order(module, x):
        x = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [x, *module.parameters()])

    x = torch.randn(9, 40)
    floor = {"e4m3": 18, "e5m2": 13, "e2m1": 6}[ELEMENT[fmt]]  # three block-scaled GEMMs deep
    for r, got in zip(second_order(ref_layer, x.double()), second_order(layer, x)):
        assert sqnr_db(r, got) >= floor

    layer = BlockScaledLinear(40, 24, format=fmt, grad_weight="format")
    x = torch.randn(9, 40, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(layer(x).square().sum(), [x, layer.weight], create_graph=True)


# --- Names, config, the simulation note ---------------------------------------------------------


def test_swap_by_name_and_config_checks():
    for fmt in NAMES:
        model = lowbit.swap(nn.Sequential(nn.Linear(8, 8)), fmt, filter_fn=lowbit.ALL)
        assert isinstance(model[0], BlockScaledLinear) and model[0].config.format == fmt
        assert f"format={fmt!r}" in repr(model)
    with pytest.raises(ValueError, match="format"):
        BlockConfig("mxfp6")
    with pytest.raises(ValueError, match="grad_weight"):
        BlockConfig("mxfp8", grad_weight="fp8")


def test_simulation_note_only_where_a_real_kernel_could_run(monkeypatch):
    cuda = torch.device("cuda", 0)
    assert block_ops.simulation_note("mxfp8", torch.device("cpu")) is None
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(block_ops, "_cuda_capability", lambda index: (9, 0))  # Hopper
    assert block_ops.simulation_note("mxfp8", cuda) is None and block_ops.simulation_note("nvfp4", cuda) is None
    # fp8-blockwise runs on Hopper's tensor cores (lowbit.mx.real; tests/test_mx_real.py): no note
    assert block_ops.simulation_note("fp8-blockwise", cuda) is None
    monkeypatch.setattr(block_ops, "_cuda_capability", lambda index: (10, 0))  # Blackwell
    note = block_ops.simulation_note("mxfp4", cuda)
    assert "mxfp4" in note and "simulated" in note
    with lowbit.use_backend("torch"):  # the plain-torch reference, asked for
        assert block_ops.simulation_note("mxfp4", cuda) is None

    block_ops.note_simulated.cache_clear()
    with pytest.warns(UserWarning, match="mxfp4") as record:
        block_ops.note_simulated(note)
        block_ops.note_simulated(note)
    assert len(record) == 1


def test_no_note_on_the_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BlockScaledLinear(8, 8, format="nvfp4")(torch.randn(2, 8))
