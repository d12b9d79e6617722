"""lowbit.kernels.int8_matmul_dequant against its torch twin (bit for bit) and fp64 references."""

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.int8 import ops
from tests.kernels._utils import DEVICE, FLOAT_DTYPES, assert_bitwise_equal, twin, via_ops
from tests.reference import sqnr_db

# The interpreter runs numpy, which warns on the 0 * NaN that a NaN scale makes on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

# (M, K, N): ragged, single rows/columns, K below / past the interpreter's 32-wide K tile and uneven.
SHAPES = [(1, 1, 1), (5, 3, 7), (1, 300, 1), (37, 56, 72), (16, 64, 48), (33, 100, 17)]
# SQNR floors of the output against fp64, set by the output dtype's mantissa (fp32 by its accumulation).
SQNR_FLOOR_DB = {torch.float32: 120.0, torch.float16: 60.0, torch.bfloat16: 45.0}


def _operands(m, k, n, *, col_scale, bias_dtype, seed):
    """Random int8 a (M, K), b as the transposed view of an (N, K) weight, positive scales, a bias."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    a_absmax = torch.rand(m, generator=g) * 4 + 0.1
    b_absmax = torch.rand(n if col_scale else (), generator=g) * 2 + 0.1
    bias = None if bias_dtype is None else (torch.randn(n, generator=g) * 10).to(bias_dtype)
    a, w, a_absmax, b_absmax = (t.to(DEVICE) for t in (a, w, a_absmax, b_absmax))
    return a, w.t(), a_absmax, b_absmax, None if bias is None else bias.to(DEVICE)


def _reference(a, b, a_absmax, b_absmax, bias):
    """fp64 (a @ b) * a_absmax[:, None] * b_absmax / 127**2 + bias: exact int products, no fp32 roundings."""
    out = a.cpu().double() @ b.cpu().double()
    out = out * a_absmax.cpu().double()[:, None] * b_absmax.cpu().double() / 127**2
    return out if bias is None else out + bias.cpu().double()


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_twin(shape, out_dtype):
    i = SHAPES.index(shape)
    # Alternate scale kind and bias over the shapes so each dtype meets every combination.
    bias_dtype = (None, torch.float32, torch.bfloat16)[i % 3]
    *args, bias = _operands(*shape, col_scale=i % 2 == 0, bias_dtype=bias_dtype, seed=i)
    got = kernels.int8_matmul_dequant(*args, bias=bias, out_dtype=out_dtype)
    assert got.shape == (shape[0], shape[2]) and got.dtype == out_dtype and got.is_contiguous()
    assert_bitwise_equal(got, twin("int8_matmul_dequant", *args, bias=bias, out_dtype=out_dtype))
    assert_bitwise_equal(via_ops("int8_matmul_dequant", *args, bias=bias, out_dtype=out_dtype), got)


@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("col_scale", [False, True])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_against_fp64(out_dtype, col_scale, bias_dtype):
    a, b, a_absmax, b_absmax, bias = _operands(40, 96, 70, col_scale=col_scale, bias_dtype=bias_dtype, seed=7)
    got = kernels.int8_matmul_dequant(a, b, a_absmax, b_absmax, bias=bias, out_dtype=out_dtype)
    ref = _reference(a, b, a_absmax, b_absmax, bias)
    assert sqnr_db(ref, got) > SQNR_FLOOR_DB[out_dtype]
    if out_dtype == torch.float32:
        # int32 -> fp32 is exact here (|acc| < 2**24); 4 fp32 roundings in the epilogue.
        bound = 4 * 2**-24 * (ref.abs() + (0 if bias is None else bias.cpu().double().abs()))
        assert ((got.cpu().double() - ref).abs() <= bound).all()


def test_col_scale_equal_to_tensor_scale():
    a, b, a_absmax, b_absmax, bias = _operands(37, 56, 72, col_scale=False, bias_dtype=torch.float32, seed=8)
    tensor_out = kernels.int8_matmul_dequant(a, b, a_absmax, b_absmax, bias=bias)
    col_out = kernels.int8_matmul_dequant(a, b, a_absmax, b_absmax.expand(72), bias=bias)
    assert_bitwise_equal(col_out, tensor_out)


def test_operand_layouts():
    """Any strides: contiguous B, B = w.t(), sliced and transposed A, strided scales and bias."""
    g = torch.Generator().manual_seed(9)
    a_big = torch.randint(-127, 128, (80, 130), generator=g, dtype=torch.int8).to(DEVICE)
    b_big = torch.randint(-127, 128, (120, 90), generator=g, dtype=torch.int8).to(DEVICE)
    s_big = (torch.rand(200, generator=g) + 0.5).to(DEVICE)
    bias_big = torch.randn(200, generator=g).to(DEVICE)
    a_views = [a_big[:37, :45], a_big[1:75:2, 3:93:2], a_big.t()[:37, :45]]
    b_views = [b_big[:45, :50], b_big.t()[:45, :50], b_big[10:100:2, ::2][:, :50]]
    for a in a_views:
        for b in b_views:
            m, n = a.shape[0], b.shape[1]
            args = (a, b, s_big[:m], s_big[::4][:n])
            kw = {"bias": bias_big[1::3][:n], "out_dtype": torch.bfloat16}
            got = kernels.int8_matmul_dequant(*args, **kw)
            assert_bitwise_equal(got, twin("int8_matmul_dequant", *args, **kw))
            contiguous = kernels.int8_matmul_dequant(*(t.contiguous() for t in args), **kw)
            assert_bitwise_equal(got, contiguous)


@pytest.mark.parametrize("variant", ["tensor", "row", "grad_input_tensor", "grad_input_col"])
def test_switchback_pipelines(variant):
    """Quantize with the kernels, multiply with the kernel: SwitchBack's gemms against fp64."""
    torch.manual_seed(10)
    x = (torch.randn(48, 96) * 2).to(DEVICE)  # input (or grad_output for the grad_input gemms)
    w = (torch.randn(80, 96) * 0.05).to(DEVICE)  # weight (out, in)
    bias = torch.randn(80).to(DEVICE)
    q_x, s_x = kernels.quantize_rowwise(x)
    if variant == "tensor":  # output = x @ w.T, weight tensor-wise
        q_w, s_w = kernels.quantize_tensorwise(w)
        got = kernels.int8_matmul_dequant(q_x, q_w.t(), s_x, s_w, bias=bias)
        ref = x.double() @ w.double().t() + bias.double()
    elif variant == "row":  # output = x @ w.T, weight row-wise = column scales of w.T
        q_w, s_w = kernels.quantize_rowwise(w)
        got = kernels.int8_matmul_dequant(q_x, q_w.t(), s_x, s_w, bias=bias)
        ref = x.double() @ w.double().t() + bias.double()
    else:  # grad_input = g @ w, with g (48, 80) and a K-major int8 copy of w
        g = x[:, :80].contiguous()
        q_g, s_g = kernels.quantize_rowwise(g)
        if variant == "grad_input_tensor":
            q_wt, s_w = kernels.quantize_tensorwise(w, transpose=True)  # (96, 80) = w.T, contiguous
        else:
            q_wt, s_w = kernels.quantize_colwise_transposed(w)  # (96, 80), one scale per in-feature
        got = kernels.int8_matmul_dequant(q_g, q_wt.t(), s_g, s_w)
        ref = g.double() @ w.double()
    assert sqnr_db(ref, got) > 30  # two int8 quantizations of Gaussian data: ~38 dB


def test_non_finite_scales_poison_only_their_row_and_column():
    a, b, a_absmax, b_absmax, bias = _operands(37, 56, 72, col_scale=True, bias_dtype=torch.float32, seed=11)
    a_absmax[3] = float("nan")  # a row quantized from inf/NaN
    b_absmax[5] = float("nan")
    got = kernels.int8_matmul_dequant(a, b, a_absmax, b_absmax, bias=bias, out_dtype=torch.bfloat16)
    want = twin("int8_matmul_dequant", a, b, a_absmax, b_absmax, bias=bias, out_dtype=torch.bfloat16)
    assert_bitwise_equal(got, want)
    nan = torch.zeros(37, 72, dtype=torch.bool)
    nan[3, :] = True
    nan[:, 5] = True
    assert torch.equal(got.isnan().cpu(), nan)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_empty_inner_dim_gives_bias(out_dtype):
    """K = 0: 0 * scale + bias. A bias of random fp32 bit patterns (subnormals, inf, NaN, near-overflow)
    also checks that the one rounding to out_dtype is round-to-nearest-even everywhere."""
    g = torch.Generator().manual_seed(12)
    n = 2048
    bias = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int32).view(torch.float32)
    bias[:4] = torch.tensor([3.3961e38, -3.3962e38, 1e-40, -0.0])  # bf16 round-to-inf boundary, subnormal
    a = torch.empty(3, 0, dtype=torch.int8, device=DEVICE)
    b = torch.empty(0, n, dtype=torch.int8, device=DEVICE)
    a_absmax = torch.tensor([1.0, 2.0, float("nan")], device=DEVICE)
    args = (a, b, a_absmax, torch.tensor(1.5, device=DEVICE))
    got = kernels.int8_matmul_dequant(*args, bias=bias.to(DEVICE), out_dtype=out_dtype)
    assert_bitwise_equal(got, twin("int8_matmul_dequant", *args, bias=bias.to(DEVICE), out_dtype=out_dtype))
    assert_bitwise_equal(got[0], (bias + 0.0).to(out_dtype))
    assert got[2].isnan().all()
    no_bias = kernels.int8_matmul_dequant(*args, out_dtype=out_dtype)
    assert (no_bias[:2] == 0).all() and no_bias[2].isnan().all()


@pytest.mark.parametrize("m, n", [(0, 5), (5, 0), (0, 0)])
def test_empty_output(m, n):
    a = torch.zeros(m, 8, dtype=torch.int8, device=DEVICE)
    b = torch.zeros(8, n, dtype=torch.int8, device=DEVICE)
    out = kernels.int8_matmul_dequant(
        a, b, torch.ones(m, device=DEVICE), torch.ones(n, device=DEVICE), bias=torch.ones(n, device=DEVICE),
        out_dtype=torch.float16,
    )
    assert out.shape == (m, n) and out.dtype == torch.float16


def test_bad_inputs():
    a = torch.zeros(4, 8, dtype=torch.int8, device=DEVICE)
    b = torch.zeros(8, 6, dtype=torch.int8, device=DEVICE)
    sa, sb = torch.ones(4, device=DEVICE), torch.ones((), device=DEVICE)
    mm = kernels.int8_matmul_dequant
    with pytest.raises(TypeError, match="int8"):
        mm(a.float(), b, sa, sb)
    with pytest.raises(TypeError, match="int8"):
        mm(a, b.to(torch.uint8), sa, sb)
    with pytest.raises(ValueError, match="cannot multiply"):
        mm(a, b[:7], sa, sb)
    with pytest.raises(ValueError, match="cannot multiply"):
        mm(a[0], b, sa, sb)
    with pytest.raises(ValueError, match="scales"):
        mm(a, b, sa[:3], sb)
    with pytest.raises(ValueError, match="scales"):
        mm(a, b, sa, torch.ones(5, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        mm(a, b, sa, sb, bias=torch.ones(5, device=DEVICE))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        mm(a, b, sa.to(torch.int32), sb)
    with pytest.raises(TypeError, match="out_dtype"):
        mm(a, b, sa, sb, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        mm(a, b, sa, 1.0)
    k = kernels.MAX_INNER_DIM + 1  # could overflow the int32 accumulator
    with pytest.raises(ValueError, match="overflow"):
        mm(a[:1, :1].expand(1, k), b[:1, :1].expand(k, 1), sa[:1], sb)


@pytest.mark.gpu
def test_cpu_tensors_need_interpreter():
    a = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.int8_matmul_dequant(a, a.t(), torch.ones(4), torch.ones(()))
    with pytest.raises(ValueError, match="different devices"):
        kernels.int8_matmul_dequant(a.cuda(), a.t().cuda(), torch.ones(4), torch.ones(()).cuda())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m, k, n, out_dtype, col_scale",
    [
        (32768, 1280, 5120, torch.bfloat16, False),  # ViT-H MLP up-projection, tensor-wise weight
        (32768, 5120, 1280, torch.bfloat16, True),  # down-projection, row-wise weight
        (8192, 1280, 5120, torch.float32, True),
        (8191, 1000, 3001, torch.float16, False),  # ragged: masked edges, K not a multiple of BLOCK_SIZE_K
    ],
)
def test_gpu_realistic_sizes(m, k, n, out_dtype, col_scale):
    torch.manual_seed(13)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    q_x, s_x = kernels.quantize_rowwise(x)
    q_w, s_w = kernels.quantize_rowwise(w) if col_scale else kernels.quantize_tensorwise(w)
    args = (q_x, q_w.t(), s_x, s_w)  # B = w.T: K-major, as Hopper's int8 wgmma wants
    got = kernels.int8_matmul_dequant(*args, bias=bias, out_dtype=out_dtype)
    want = twin("int8_matmul_dequant", *args, bias=bias, out_dtype=out_dtype)  # exact int32 products
    assert_bitwise_equal(got, want)
    with lowbit.use_backend("auto"):  # auto picks Triton for CUDA tensors
        assert_bitwise_equal(ops.int8_matmul_dequant(*args, bias=bias, out_dtype=out_dtype), got)
    rows = slice(0, 512)  # an fp64 check on a slice keeps the reference cheap
    ref = _reference(q_x[rows], q_w.t(), s_x[rows], s_w, bias)
    assert sqnr_db(ref, got[rows]) > SQNR_FLOOR_DB[out_dtype]
    # Against the unquantized product: int8 x (row-wise) and w (a 6.5M-element tensor-wise absmax sits
    # ~5 sigma out) give ~31 dB before the bias adds signal.
    assert sqnr_db(x[rows].double() @ w.double().t() + bias.double(), got[rows]) > 25


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_autotune_configs_are_pruned_to_one_generation_without_repeats(monkeypatch, capability):
    """A config in both generation lists must be benchmarked once, not twice."""
    from lowbit.kernels import int8_matmul

    monkeypatch.setattr(int8_matmul, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    everything = int8_matmul._AMPERE_CONFIGS + int8_matmul._HOPPER_CONFIGS
    kept = int8_matmul._prune_for_device(everything, {"a_ptr": torch.empty(0)})
    wanted = int8_matmul._HOPPER_CONFIGS if capability >= (9, 0) else int8_matmul._AMPERE_CONFIGS
    assert [str(c) for c in kept] == [str(c) for c in wanted]
    assert len({str(c) for c in kept}) == len(kept)
