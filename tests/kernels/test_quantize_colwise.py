"""lowbit.kernels.quantize_colwise_transposed against its torch twin (bit for bit) and the fp64 rule."""

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

# The interpreter runs numpy, which warns on the inf * 0 and overflows the rule handles on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

# Ragged shapes; the larger ones span several (32, 64) interpreter tiles each way, so a column's
# absmax is merged across row tiles.
SHAPES = [(1, 1), (5, 3), (200, 1), (37, 72), (70, 150)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_twin(shape, dtype):
    torch.manual_seed(21)
    x = (torch.randn(shape) * 4).to(dtype).to(DEVICE)
    got = kernels.quantize_colwise_transposed(x)
    assert_same_quantization(got, twin("quantize_colwise_transposed", x))
    assert_same_quantization(via_ops("quantize_colwise_transposed", x), got)
    assert got[0].shape == shape[::-1] and got[1].shape == (shape[1],) and got[1].dtype == torch.float32


def test_is_rowwise_of_the_transpose():
    torch.manual_seed(22)
    x = torch.randn(70, 150, device=DEVICE)
    assert_same_quantization(kernels.quantize_colwise_transposed(x), kernels.quantize_rowwise(x.t()))


def test_against_fp64_reference():
    torch.manual_seed(23)
    x = torch.randn(256, 256) * torch.rand(1, 256) * 10  # per-column spread, like weight columns
    q, absmax = kernels.quantize_colwise_transposed(x.to(DEVICE))
    mismatches = check_against_fp64(q.t(), absmax, x, dim=0)
    assert mismatches / x.numel() < 1e-3
    q_ref, absmax_ref = quantize_ref(x, 0)
    assert sqnr_db(dequantize_ref(q_ref, absmax_ref), dequantize_ref(q.t().cpu().double(), absmax_ref)) > 60
    assert sqnr_db(x, dequantize_ref(q.t().cpu().double(), absmax.cpu().double())) > 30


def test_ties_round_to_even():
    x = torch.tensor([[127.0, 254.0], [0.5, 1.0], [1.5, 3.0], [2.5, 5.0], [-2.5, -5.0], [126.5, 253.0]])
    q, absmax = kernels.quantize_colwise_transposed(x.to(DEVICE))
    assert_bitwise_equal(q, torch.tensor([[127, 0, 2, 2, -2, 126]] * 2, dtype=torch.int8))
    assert_bitwise_equal(absmax, torch.tensor([127.0, 254.0]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_inf_nan_columns(dtype):
    torch.manual_seed(24)
    x = torch.randn(70, 9)
    x[:, 1] = 0.0
    x[65, 2] = float("inf")  # in the third row tile: the column max crosses tiles
    x[0, 4] = -float("inf")
    x[33, 6] = float("nan")
    x[:, 7] = float("nan")
    x = x.to(dtype).to(DEVICE)
    q, absmax = kernels.quantize_colwise_transposed(x)
    assert_same_quantization((q, absmax), twin("quantize_colwise_transposed", x))
    bad = [2, 4, 6, 7]
    assert (q[bad] == 0).all() and absmax[bad].isnan().all()
    assert (q[1] == 0).all() and absmax[1] == 0
    good = [0, 3, 5, 8]
    assert absmax[good].isfinite().all()  # NaN/inf stay in their own column
    assert_same_quantization((q[good], absmax[good]), kernels.quantize_colwise_transposed(x[:, good]))


def test_extreme_magnitudes():
    x = torch.zeros(40, 4)
    x[::3, 0] = 1e-40  # subnormal absmax: 127 / absmax overflows to inf
    x[:, 1] = 3.0e38 * torch.linspace(-1, 1, 40)
    x[:, 2] = 1e-37 * torch.linspace(-1, 1, 40)
    x[:, 3] = torch.finfo(torch.float32).tiny * torch.linspace(-1, 1, 40)
    x = x.to(DEVICE)
    assert_same_quantization(kernels.quantize_colwise_transposed(x), twin("quantize_colwise_transposed", x))


def test_non_contiguous_inputs():
    torch.manual_seed(25)
    base = torch.randn(80, 150).to(DEVICE)
    # w.t() is how the row-wise SwitchBack variant hands the weight over: the kernel reads it in place.
    views = [base.t(), base[3:70:2, 5:140:3], base[:1].expand(20, 150), base.bfloat16().t()[10:90]]
    for x in views:
        got = kernels.quantize_colwise_transposed(x)
        assert_same_quantization(got, twin("quantize_colwise_transposed", x))
        assert_same_quantization(got, kernels.quantize_colwise_transposed(x.contiguous()))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_empty(shape):
    x = torch.empty(shape, device=DEVICE)
    q, absmax = kernels.quantize_colwise_transposed(x)
    assert q.shape == shape[::-1] and q.dtype == torch.int8
    assert_bitwise_equal(absmax, torch.zeros(shape[1]))
    assert_same_quantization((q, absmax), twin("quantize_colwise_transposed", x))


def test_bad_inputs():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kernels.quantize_colwise_transposed(torch.ones(4, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="2-D"):
        kernels.quantize_colwise_transposed(torch.ones(4, device=DEVICE))
    with pytest.raises(TypeError, match="torch.Tensor"):
        kernels.quantize_colwise_transposed(None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(8192, 5120), (5120, 1280), (4097, 771)])
def test_gpu_realistic_sizes(shape, dtype):
    torch.manual_seed(26)
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    x[shape[0] - 1, 5] = float("inf")
    got = kernels.quantize_colwise_transposed(x)
    assert_same_quantization(got, twin("quantize_colwise_transposed", x))
    with lowbit.use_backend("auto"):  # auto picks Triton for CUDA tensors
        assert_same_quantization(ops.quantize_colwise_transposed(x), got)
    assert got[1][5].isnan() and (got[0][5] == 0).all() and got[1].isnan().sum() == 1
