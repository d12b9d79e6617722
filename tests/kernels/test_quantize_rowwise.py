"""lowbit.kernels.quantize_rowwise against its torch twin (bit for bit) and the fp64 rule."""

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.int8 import ops
from tests.kernels._utils import (
    DEVICE,
    FLOAT_DTYPES,
    assert_bitwise_equal,
    assert_same_quantization,
    check_against_fp64,
    twin,
    via_ops,
)
from tests.reference import dequantize_ref, quantize_ref, sqnr_db

# Ragged shapes: single rows/columns, K below, at and past the interpreter's 64-wide tile (the loop).
# The interpreter runs numpy, which warns on the inf * 0 and overflows the rule handles on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

SHAPES = [(1, 1), (5, 3), (1, 200), (37, 72), (17, 64), (40, 130)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_twin(shape, dtype):
    torch.manual_seed(1)
    x = (torch.randn(shape) * 4).to(dtype).to(DEVICE)
    got = kernels.quantize_rowwise(x)
    assert_same_quantization(got, twin("quantize_rowwise", x))
    assert_same_quantization(via_ops("quantize_rowwise", x), got)
    assert got[0].shape == shape and got[1].shape == (shape[0],) and got[1].dtype == torch.float32


def test_against_fp64_reference():
    torch.manual_seed(2)
    x = torch.randn(128, 512) * torch.rand(128, 1) * 10
    x[:, 7] *= 30  # outlier features, as in CLIP activations
    q, absmax = kernels.quantize_rowwise(x.to(DEVICE))
    mismatches = check_against_fp64(q, absmax, x, dim=1)
    assert mismatches / x.numel() < 1e-3
    q_ref, absmax_ref = quantize_ref(x, 1)
    assert sqnr_db(dequantize_ref(q_ref, absmax_ref), dequantize_ref(q.cpu().double(), absmax_ref)) > 60
    assert sqnr_db(x, dequantize_ref(q.cpu().double(), absmax.cpu().double()[:, None])) > 25


def test_ties_round_to_even():
    # absmax 127 makes 127 / absmax exactly 1 and 254 makes it 0.5, so these land exactly on ties.
    x = torch.tensor(
        [
            [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5],
            [254.0, 1.0, 3.0, 5.0, -1.0, -3.0, -5.0, 253.0],
        ]
    )
    q, absmax = kernels.quantize_rowwise(x.to(DEVICE))
    expected = torch.tensor([[127, 0, 2, 2, 0, -2, -2, 126]] * 2, dtype=torch.int8)
    assert_bitwise_equal(q, expected)
    assert_bitwise_equal(absmax, torch.tensor([127.0, 254.0]))
    assert_same_quantization((q, absmax), twin("quantize_rowwise", x.to(DEVICE)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_inf_nan_rows(dtype):
    torch.manual_seed(3)
    x = torch.randn(9, 100)
    x[1] = 0.0
    x[2, 5] = float("inf")
    x[4, 99] = -float("inf")
    x[6, 0] = float("nan")
    x[7] = float("nan")
    x = x.to(dtype).to(DEVICE)
    q, absmax = kernels.quantize_rowwise(x)
    assert_same_quantization((q, absmax), twin("quantize_rowwise", x))
    bad = [2, 4, 6, 7]
    assert (q[bad] == 0).all() and absmax[bad].isnan().all()
    assert (q[1] == 0).all() and absmax[1] == 0
    good = [0, 3, 5, 8]
    assert absmax[good].isfinite().all()  # NaN/inf stay in their own row
    assert_same_quantization((q[good], absmax[good]), kernels.quantize_rowwise(x[good]))


def test_extreme_magnitudes():
    # Subnormal and near-overflow rows follow the rule too (127 / absmax alone would overflow to inf).
    x = torch.zeros(5, 40)
    x[0, ::3] = 1e-40
    x[1] = 3.0e38 * torch.linspace(-1, 1, 40)
    x[2] = 1e-37 * torch.linspace(-1, 1, 40)
    x[3] = torch.finfo(torch.float32).tiny * torch.linspace(-1, 1, 40)
    x[4, :4] = torch.tensor([1e-37, 2e-38, -5e-38, 0.0])
    x = x.to(DEVICE)
    q, absmax = kernels.quantize_rowwise(x)
    assert_same_quantization((q, absmax), twin("quantize_rowwise", x))
    q_ref, absmax_ref = quantize_ref(x.cpu(), 1)
    assert (q.cpu().double() - q_ref).abs().max() <= 1
    assert q[4, 0] == 127 and q[4, 1] == 25 and -64 <= q[4, 2] <= -63  # not saturated at +-127 (-63.5: a near-tie)
    torch.testing.assert_close(absmax.cpu().double(), absmax_ref.squeeze(1), rtol=0, atol=0)


def test_non_contiguous_inputs():
    torch.manual_seed(4)
    base = torch.randn(80, 150).to(DEVICE)
    views = [
        base.t(),  # stride (1, 150)
        base[3:70:2, 5:140:3],  # strides (300, 3)
        base[:1].expand(20, 150),  # stride 0
        base.to(torch.bfloat16).t()[10:90],
    ]
    for x in views:
        assert_same_quantization(kernels.quantize_rowwise(x), twin("quantize_rowwise", x))
        assert_same_quantization(kernels.quantize_rowwise(x), kernels.quantize_rowwise(x.contiguous()))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_empty(shape):
    x = torch.empty(shape, device=DEVICE)
    q, absmax = kernels.quantize_rowwise(x)
    assert q.shape == shape and q.dtype == torch.int8
    assert_bitwise_equal(absmax, torch.zeros(shape[0]))
    assert_same_quantization((q, absmax), twin("quantize_rowwise", x))


def test_bad_inputs():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kernels.quantize_rowwise(torch.ones(4, 4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kernels.quantize_rowwise(torch.ones(4, 4, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="2-D"):
        kernels.quantize_rowwise(torch.ones(2, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="2-D"):
        kernels.quantize_rowwise(torch.ones(4, device=DEVICE))
    with pytest.raises(TypeError, match="torch.Tensor"):
        kernels.quantize_rowwise([[1.0, 2.0]])


@pytest.mark.gpu
def test_cpu_tensor_needs_interpreter():
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.quantize_rowwise(torch.ones(4, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(8192, 5120), (32768, 1280), (4097, 771)])
def test_gpu_realistic_sizes(shape, dtype):
    torch.manual_seed(5)
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    x[17, 3] = float("nan")
    got = kernels.quantize_rowwise(x)
    assert_same_quantization(got, twin("quantize_rowwise", x))
    with lowbit.use_backend("auto"):  # auto picks Triton for CUDA tensors
        assert_same_quantization(ops.quantize_rowwise(x), got)
