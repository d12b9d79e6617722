"""lowbit.int8.ops.dequantize_rowwise on the Triton kernel against its torch twin (bit for bit) and the
fp64 rule q * (absmax / 127)."""

import pytest
import torch

from tests.kernels._utils import DEVICE, assert_bitwise_equal, twin, via_ops

SHAPES = [(1, 1), (5, 3), (17, 64), (40, 130), (3, 200)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_twin_and_the_fp64_rule(shape, dtype):
    torch.manual_seed(5)
    q = torch.randint(-127, 128, shape, dtype=torch.int8, device=DEVICE)
    absmax = (torch.rand(shape[0]) * 20).to(DEVICE)
    got = via_ops("dequantize_rowwise", q, absmax, dtype)
    assert got.dtype == dtype and got.shape == shape and got.is_contiguous()
    assert_bitwise_equal(got, twin("dequantize_rowwise", q, absmax, dtype))
    exact = q.cpu().double() * (absmax.cpu().double()[:, None] / 127)
    # two fp32 roundings (the scale, the product), then the output's own
    eps = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(dtype, 2.0**-24)
    assert ((got.cpu().double() - exact).abs() <= (eps + 2 * 2.0**-24) * exact.abs() + 1e-30).all()


def test_a_nan_scale_poisons_its_row_only():
    q = torch.ones(4, 9, dtype=torch.int8, device=DEVICE)
    absmax = torch.tensor([127.0, float("nan"), 0.0, 254.0], device=DEVICE)
    got = via_ops("dequantize_rowwise", q, absmax, torch.bfloat16).float().cpu()
    assert (got[0] == 1).all() and got[1].isnan().all() and (got[2] == 0).all() and (got[3] == 2).all()


def test_empty_and_bad_inputs():
    assert via_ops("dequantize_rowwise", torch.zeros(0, 4, dtype=torch.int8, device=DEVICE),
                   torch.zeros(0, device=DEVICE), torch.float32).shape == (0, 4)
    q = torch.zeros(3, 4, dtype=torch.int8, device=DEVICE)
    with pytest.raises(TypeError, match="int8"):
        via_ops("dequantize_rowwise", q.float(), torch.ones(3, device=DEVICE), torch.float32)
    with pytest.raises(ValueError, match="absmax"):
        via_ops("dequantize_rowwise", q, torch.ones(4, device=DEVICE), torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        via_ops("dequantize_rowwise", q, torch.ones(3, device=DEVICE), torch.int32)
