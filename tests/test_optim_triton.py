"""StableAdamW's multi-tensor Triton step (lowbit/kernels/stable_adamw.py; on the CPU through Triton's
interpreter) against the fp64 rule and against the foreach path, and when it is (not) taken."""

import copy

import pytest
import torch

import lowbit
from lowbit.optim import StableAdamW
from lowbit.optim import stable_adamw as stable_adamw_module
from tests.kernels._utils import DEVICE
from tests.test_optim import SPIKE_STEPS, RefStableAdamW, compute_grads, make_groups, make_model, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@pytest.fixture
def triton_steps(monkeypatch):
    """How many buckets the Triton step updated."""
    calls = []
    step = stable_adamw_module._triton_step

    def record(params, *args, **kwargs):
        calls.append(len(params))
        return step(params, *args, **kwargs)

    monkeypatch.setattr(stable_adamw_module, "_triton_step", record)
    return calls


def test_matches_the_fp64_rule_with_spikes_and_groups(triton_steps):
    model = make_model()  # its gradients, on the CPU; the optimizer steps a copy on DEVICE
    on_device = copy.deepcopy(model).to(DEVICE)
    pairs = list(zip(on_device.parameters(), model.parameters()))
    opt = StableAdamW(make_groups(on_device), lr=1e-3, betas=(0.9, 0.99), eps=1e-6, foreach=True)
    ref, ref_params = RefStableAdamW(), {p: p.detach().cpu().double().clone() for p, _ in pairs}
    worst = 0.0
    for step in range(30):
        compute_grads(model, step)
        for p, cpu in pairs:
            p.grad = cpu.grad.to(DEVICE)
        ref_rms = {}
        for group in opt.param_groups:
            for p in group["params"]:
                ref_params[p], ref_rms[p], _ = ref.step(
                    p, ref_params[p], p.grad.cpu(), lr=group["lr"], betas=group["betas"], eps=group["eps"],
                    weight_decay=group["weight_decay"], clip_threshold=group["clip_threshold"],
                )
        with lowbit.use_backend("triton"):
            opt.step()
        with torch.no_grad():
            for p, cpu in pairs:
                cpu.copy_(p)
        for p in on_device.parameters():
            st = opt.state[p]
            errs = [rel_err(p.cpu(), ref_params[p]), rel_err(st["exp_avg"].cpu(), ref.state[p]["v"]),
                    rel_err(st["exp_avg_sq"].cpu(), ref.state[p]["u"]), abs(st["rms"].item() - ref_rms[p]) / ref_rms[p]]
            assert max(errs) <= 1e-5, (step, errs)
            worst = max(worst, *errs)
            if step in SPIKE_STEPS:
                assert st["rms"].item() > group["clip_threshold"]  # the spike trips the clip
    assert triton_steps == [1, 2, 1] * 30  # every group's bucket, every step
    print(f"max relative error vs fp64: {worst:.2e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_agrees_with_the_foreach_path(dtype, weight_decay, triton_steps):
    # sizes: one element, empty, one block, several blocks with a ragged end (the interpreter's block is 256)
    torch.manual_seed(0)
    shapes = [(37, 5), (1,), (0,), (256,), (600, 3)]
    a = [torch.randn(s, dtype=dtype, device=DEVICE) for s in shapes]
    b = [t.clone() for t in a]
    opt_a = StableAdamW(a, lr=1e-2, weight_decay=weight_decay, foreach=True)
    opt_b = StableAdamW(b, lr=1e-2, weight_decay=weight_decay, foreach=True)
    for step in range(6):
        grads = [torch.randn_like(t) * (30.0 if step == 3 else 1.0) for t in a]
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        with lowbit.use_backend("torch"):
            opt_a.step()
        with lowbit.use_backend("triton"):
            opt_b.step()
    assert triton_steps == [len(shapes)] * 6
    for x, y in zip(a, b):
        sa, sb = opt_a.state[x], opt_b.state[y]
        assert sb["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(sb["rms"], sa["rms"], rtol=1e-6, atol=0)
        for key in ("exp_avg", "exp_avg_sq"):  # fp32 rounding of the same ops (torch's CPU lerp uses fma)
            assert rel_err(sb[key], sa[key]) <= 1e-6, key
        # one rounding to the parameter's dtype apart at most: the fp32 values differ in their last bit
        # (fma), so a near-tie may round either way: one ulp, which relative to |x| is up to 2**-7 (bf16) or
        # 2**-10 (fp16); the old 2**-8 / 2**-11 held only near a binade's top (fp16 failed on torch 2.11)
        tol = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
        torch.testing.assert_close(y.float(), x.float(), rtol=tol, atol=1e-7)


def test_falls_back_to_foreach_where_the_kernel_does_not_apply(triton_steps):
    """float64 parameters and a non-contiguous parameter take the foreach path, with its results."""
    torch.manual_seed(1)
    cases = [
        [torch.nn.Parameter(torch.randn(5, 7, dtype=torch.float64, device=DEVICE))],
        [torch.nn.Parameter(torch.randn(7, 5, device=DEVICE).t())],  # strided
    ]
    for params in cases:
        ref = [p.detach().clone().requires_grad_() for p in params]
        for p, r in zip(params, ref):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        with lowbit.use_backend("triton"):
            StableAdamW(params, lr=1e-2, foreach=True).step()
        with lowbit.use_backend("torch"):
            StableAdamW(ref, lr=1e-2, foreach=True).step()
        for p, r in zip(params, ref):
            assert torch.equal(p.detach(), r.detach())
    assert triton_steps == []


def test_not_taken_on_cpu_tensors_by_default(triton_steps):
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    with lowbit.use_backend("auto"):  # auto: Triton for CUDA tensors only
        StableAdamW([p], foreach=True).step()
    assert triton_steps == []


def test_state_of_other_parameters_gets_the_foreach_error_not_the_kernel(triton_steps):
    """A state dict saved for parameters in another order gives state of the wrong sizes: the kernel
    (which walks raw addresses by each parameter's size) must not run on it."""
    a, b = torch.nn.Parameter(torch.randn(300, device=DEVICE)), torch.nn.Parameter(torch.randn(10, device=DEVICE))
    for p in (a, b):
        p.grad = torch.randn_like(p)
    opt = StableAdamW([a, b], foreach=True)
    with lowbit.use_backend("triton"):
        opt.step()
    assert triton_steps == [2]
    swapped = StableAdamW([b.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()], foreach=True)
    swapped.load_state_dict(opt.state_dict())
    for p in swapped.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    with lowbit.use_backend("triton"), pytest.raises(RuntimeError, match="size"):
        swapped.step()
    assert triton_steps == [2]


def test_a_parameter_listed_twice_takes_the_foreach_path(triton_steps):
    p = torch.nn.Parameter(torch.randn(50, device=DEVICE))
    p.grad = torch.randn(50, device=DEVICE)
    with pytest.warns(UserWarning, match="duplicate"), lowbit.use_backend("triton"):
        StableAdamW([p, p], foreach=True).step()
    assert triton_steps == []


def test_forced_triton_backend_leaves_cpu_parameters_to_foreach(triton_steps, monkeypatch):
    """LOWBIT_BACKEND=triton is about the int8 kernels; without the interpreter, CPU parameters
    (an offloaded group) must still step, on the foreach path."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = torch.nn.Parameter(torch.randn(20))
    p.grad = torch.randn(20)
    before = p.detach().clone()
    with lowbit.use_backend("triton"):
        StableAdamW([p], lr=1e-2, foreach=True).step()
    assert triton_steps == [] and not torch.equal(p.detach(), before)


@pytest.mark.parametrize("name", ["weight_decay", "eps"])
def test_tensor_hyperparameters_get_the_foreach_answer(name, triton_steps):
    """weight_decay / eps given as 0-dim tensors (accepted, unlike lr) must give what the foreach ops
    give, not a kernel compile error (the kernel takes them as fp32 scalars)."""
    torch.manual_seed(2)
    value = {"weight_decay": 0.1, "eps": 1e-6}[name]
    a = [torch.nn.Parameter(torch.randn(37, 5, device=DEVICE)), torch.nn.Parameter(torch.randn(300, device=DEVICE))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = StableAdamW(a, lr=1e-2, foreach=True, **{name: value})
    opt_b = StableAdamW(b, lr=1e-2, foreach=True, **{name: torch.tensor(value)})
    for _ in range(3):
        for x, y in zip(a, b):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        with lowbit.use_backend("torch"):
            opt_a.step()
        with lowbit.use_backend("triton"):
            opt_b.step()
    for x, y in zip(a, b):
        assert rel_err(y.detach(), x.detach()) <= 1e-6
