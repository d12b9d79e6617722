"""lowbit.kernels.quantize_tensorwise, plain and fused-transposed, against its torch twin and fp64."""

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

# Ragged shapes, several (32, 64) interpreter tiles each way for the larger ones.
SHAPES = [(1, 1), (5, 3), (1, 200), (37, 72), (70, 150)]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_twin(shape, dtype, transpose):
    torch.manual_seed(11)
    x = (torch.randn(shape) * 4).to(dtype).to(DEVICE)
    got = kernels.quantize_tensorwise(x, transpose=transpose)
    assert_same_quantization(got, twin("quantize_tensorwise", x, transpose=transpose))
    assert_same_quantization(via_ops("quantize_tensorwise", x, transpose=transpose), got)
    assert got[0].shape == (shape[::-1] if transpose else shape) and got[1].shape == ()


def test_transpose_is_the_transpose():
    torch.manual_seed(12)
    x = torch.randn(70, 150, device=DEVICE)
    q, absmax = kernels.quantize_tensorwise(x)
    q_t, absmax_t = kernels.quantize_tensorwise(x, transpose=True)
    assert q_t.is_contiguous() and q_t.shape == (150, 70)
    assert_bitwise_equal(q_t, q.t().contiguous())
    assert_bitwise_equal(absmax_t, absmax)


def test_against_fp64_reference():
    torch.manual_seed(13)
    x = torch.randn(192, 320) * 3
    q, absmax = kernels.quantize_tensorwise(x.to(DEVICE))
    mismatches = check_against_fp64(q, absmax, x, dim=None)
    assert mismatches / x.numel() < 1e-3
    q_ref, absmax_ref = quantize_ref(x, None)
    assert sqnr_db(dequantize_ref(q_ref, absmax_ref), dequantize_ref(q.cpu().double(), absmax_ref)) > 60
    assert sqnr_db(x, dequantize_ref(q.cpu().double(), absmax.cpu().double())) > 30


def test_ties_round_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5], [-0.5, -1.5, -2.5, 126.5]])  # 127 / absmax is exactly 1
    for transpose in (False, True):
        q, absmax = kernels.quantize_tensorwise(x.to(DEVICE), transpose=transpose)
        expected = torch.tensor([[127, 0, 2, 2], [0, -2, -2, 126]], dtype=torch.int8)
        assert_bitwise_equal(q, expected.t().contiguous() if transpose else expected)
        assert_bitwise_equal(absmax, torch.tensor(127.0))


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("poison", [float("inf"), -float("inf"), float("nan")])
def test_one_non_finite_poisons_the_tensor(poison, transpose):
    torch.manual_seed(14)
    x = torch.randn(37, 72)
    x[30, 70] = poison  # in the last tile, so the cross-tile absmax must carry it
    x = x.to(DEVICE)
    q, absmax = kernels.quantize_tensorwise(x, transpose=transpose)
    assert (q == 0).all() and absmax.isnan()
    assert_same_quantization((q, absmax), twin("quantize_tensorwise", x, transpose=transpose))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_all_zero(dtype):
    x = torch.zeros(37, 72, dtype=dtype, device=DEVICE)
    q, absmax = kernels.quantize_tensorwise(x, transpose=True)
    assert (q == 0).all() and absmax == 0
    assert_same_quantization((q, absmax), twin("quantize_tensorwise", x, transpose=True))


def test_extreme_magnitudes():
    for scale in (1e-40, 1e-37, 3.0e38):  # subnormal absmax -> 127 / absmax overflows to inf
        x = (scale * torch.linspace(-1, 1, 21)).reshape(3, 7)
        x[0, 0] = 0.0
        x = x.to(DEVICE)
        assert_same_quantization(kernels.quantize_tensorwise(x), twin("quantize_tensorwise", x))


def test_non_contiguous_inputs():
    torch.manual_seed(15)
    base = torch.randn(80, 150).to(DEVICE)
    views = [base.t(), base[3:70:2, 5:140:3], base[:1].expand(20, 150), base.half().t()[10:90]]
    for x in views:
        for transpose in (False, True):
            got = kernels.quantize_tensorwise(x, transpose=transpose)
            assert_same_quantization(got, twin("quantize_tensorwise", x, transpose=transpose))


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_empty(shape, transpose):
    x = torch.empty(shape, device=DEVICE)
    q, absmax = kernels.quantize_tensorwise(x, transpose=transpose)
    assert q.shape == (shape[::-1] if transpose else shape) and q.dtype == torch.int8
    assert_bitwise_equal(absmax, torch.tensor(0.0))
    assert_same_quantization((q, absmax), twin("quantize_tensorwise", x, transpose=transpose))


def test_bad_inputs():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kernels.quantize_tensorwise(torch.ones(4, 4, dtype=torch.int8, device=DEVICE))
    with pytest.raises(ValueError, match="2-D"):
        kernels.quantize_tensorwise(torch.ones(2, 3, 4, device=DEVICE), transpose=True)
    with pytest.raises(ValueError, match="2-D"):
        kernels.quantize_tensorwise(torch.tensor(1.0, device=DEVICE))
    with pytest.raises(TypeError):
        kernels.quantize_tensorwise(torch.ones(4, 4, device=DEVICE), True)  # transpose is keyword-only


@pytest.mark.gpu
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(8192, 5120), (5120, 1280), (4097, 771)])
def test_gpu_realistic_sizes(shape, dtype, transpose):
    torch.manual_seed(16)
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    got = kernels.quantize_tensorwise(x, transpose=transpose)
    assert_same_quantization(got, twin("quantize_tensorwise", x, transpose=transpose))
    with lowbit.use_backend("auto"):  # auto picks Triton for CUDA tensors
        assert_same_quantization(ops.quantize_tensorwise(x, transpose=transpose), got)
    x[shape[0] - 1, shape[1] - 1] = float("nan")
    q, absmax = kernels.quantize_tensorwise(x, transpose=transpose)
    assert (q == 0).all() and absmax.isnan()


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (37, 72), (40, 130), (64, 64)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_and_transpose_writes_both_layouts_of_the_same_quantization(shape, dtype):
    torch.manual_seed(6)
    x = (torch.randn(shape) * 3).to(dtype).to(DEVICE)
    q, q_t, absmax = kernels.quantize_tensorwise_and_transpose(x)
    assert q.is_contiguous() and q_t.is_contiguous() and q_t.shape == shape[::-1]
    assert_same_quantization((q, absmax), kernels.quantize_tensorwise(x))
    assert_same_quantization((q_t, absmax), kernels.quantize_tensorwise(x, transpose=True))
    q2, q2_t, absmax2 = twin("quantize_tensorwise_and_transpose", x)
    assert_same_quantization((q, absmax), (q2, absmax2))
    assert_same_quantization((q_t, absmax), (q2_t, absmax2))
