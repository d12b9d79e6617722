"""StableAdamW against an independent fp64 reference of the rule in DESIGN.md ("Numerics").

The reference below is written from the paper's rule (Wortsman, Dettmers et al., 2023),
in plain float64 torch, and never calls lowbit. Gradients come from the fp32 model under test and are
handed to the reference as they are ("teacher forcing"), so the comparison measures the update
rule, not the divergence of two trajectories.
"""

import io
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.optim import StableAdamW
from lowbit.optim import stable_adamw as stable_adamw_module

REL_TOL = 1e-5  # fp32 against fp64, over the whole run
N_STEPS = 80
SPIKE_STEPS = (25, 26, 60)  # 0-based steps whose gradients are multiplied by SPIKE
SPIKE = 100.0


# ---------------------------------------------------------------------------------------------
# fp64 reference
# ---------------------------------------------------------------------------------------------


class RefStableAdamW:
    """One fp64 StableAdamW state per key; `step` returns (theta_new, rms, eta)."""

    def __init__(self):
        self.state = {}

    def step(self, key, theta, grad, *, lr, betas, eps, weight_decay, clip_threshold):
        theta, g = theta.double(), grad.double()
        st = self.state.setdefault(key, {"t": 0, "v": torch.zeros_like(g), "u": torch.zeros_like(g)})
        st["t"] += 1
        t = st["t"]
        b1, b2 = betas
        b1_hat = b1 * (1 - b1 ** (t - 1)) / (1 - b1**t)
        b2_hat = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
        st["v"] = b1_hat * st["v"] + (1 - b1_hat) * g
        st["u"] = b2_hat * st["u"] + (1 - b2_hat) * g * g
        rms = math.sqrt((g * g / torch.clamp(st["u"], min=eps**2)).mean().item())
        eta = lr / max(1.0, rms / clip_threshold)
        new_theta = theta - eta * weight_decay * theta - eta * st["v"] / (st["u"].sqrt() + eps)
        return new_theta, rms, eta


def rel_err(x, ref):
    ref = ref.double()
    denom = ref.norm().item()
    err = (x.double() - ref).norm().item()
    return err / denom if denom > 0 else err


# ---------------------------------------------------------------------------------------------
# A small model, its data, param groups and lr schedule
# ---------------------------------------------------------------------------------------------


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def make_groups(model):
    """Three groups with different lr, weight decay, betas and clip threshold."""
    w1, b1, w2, b2 = model[0].weight, model[0].bias, model[2].weight, model[2].bias
    return [
        {"params": [w1], "lr": 1e-2, "weight_decay": 0.1},
        {"params": [b1, b2], "lr": 5e-3, "weight_decay": 0.0, "betas": (0.8, 0.95)},
        {"params": [w2], "lr": 2e-2, "weight_decay": 0.05, "clip_threshold": 0.5},
    ]


def schedule(step):
    """Warm-up then cosine decay: the lr multiplier at a 0-based step."""
    return min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / N_STEPS))


def compute_grads(model, step, spike=True):
    gen = torch.Generator().manual_seed(1000 + step)
    dtype = model[0].weight.dtype
    x = torch.randn(32, 8, generator=gen).to(dtype)
    y = torch.randn(32, 4, generator=gen).to(dtype)
    model.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(x).float(), y.float())
    loss.backward()
    if spike and step in SPIKE_STEPS:
        for p in model.parameters():
            p.grad.mul_(SPIKE)
    return loss


def make_optimizer(model, foreach):
    opt = StableAdamW(make_groups(model), lr=1e-3, betas=(0.9, 0.99), eps=1e-6, foreach=foreach)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return opt, sched


def train(model, opt, sched, start, stop):
    for step in range(start, stop):
        compute_grads(model, step)
        opt.step()
        sched.step()


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_exported():
    assert lowbit.StableAdamW is StableAdamW
    assert "StableAdamW" in lowbit.__all__


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_fp64_reference_with_spikes_groups_and_schedule(foreach):
    torch.manual_seed(0)
    model = make_model()
    opt, sched = make_optimizer(model, foreach)
    base = [
        (g["initial_lr"], g["betas"], g["eps"], g["weight_decay"], g["clip_threshold"])
        for g in opt.param_groups
    ]
    ref = RefStableAdamW()
    ref_params = {p: p.detach().double().clone() for p in model.parameters()}
    worst = 0.0
    for step in range(N_STEPS):
        compute_grads(model, step)
        ref_rms, unclipped, clips = {}, {}, {}
        before = {p: p.detach().double().clone() for p in model.parameters()}
        for group, (lr0, betas, eps, wd, clip) in zip(opt.param_groups, base):
            lr = lr0 * schedule(step)  # the schedule, computed independently of the scheduler
            assert group["lr"] == pytest.approx(lr, rel=1e-12)
            for p in group["params"]:
                theta = ref_params[p]
                ref_params[p], ref_rms[p], eta = ref.step(
                    p, theta, p.grad, lr=lr, betas=betas, eps=eps, weight_decay=wd, clip_threshold=clip
                )
                st = ref.state[p]
                unclipped[p] = -lr * (wd * theta + st["v"] / (st["u"].sqrt() + eps))
                clips[p] = clip
                if step in SPIKE_STEPS:
                    # the spike must trip the clip and shrink the step size by clip / RMS
                    assert ref_rms[p] > clip
                    assert eta == pytest.approx(lr * clip / ref_rms[p], rel=1e-12) and eta < 0.5 * lr
        opt.step()
        sched.step()
        for p in model.parameters():
            st = opt.state[p]
            errs = [
                rel_err(p, ref_params[p]),
                rel_err(st["exp_avg"], ref.state[p]["v"]),
                rel_err(st["exp_avg_sq"], ref.state[p]["u"]),
                abs(st["rms"].item() - ref_rms[p]) / ref_rms[p],
            ]
            assert max(errs) <= REL_TOL, (step, errs)
            worst = max(worst, *errs)
            assert st["step"].item() == step + 1
            assert st["rms"].dtype == torch.float32 and st["rms"].dim() == 0
            if step in SPIKE_STEPS:
                # the step actually taken is the unclipped one scaled by clip / RMS
                assert st["rms"].item() > clips[p]
                taken = (p.detach().double() - before[p]).norm().item()
                scale = clips[p] / st["rms"].item()
                assert taken == pytest.approx(unclipped[p].norm().item() * scale, rel=1e-4)
    print(f"max relative error vs fp64 (foreach={foreach}): {worst:.2e}")


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_is_bit_exact(foreach):
    torch.manual_seed(0)
    model = make_model()
    opt, sched = make_optimizer(model, foreach)
    train(model, opt, sched, 0, N_STEPS)

    torch.manual_seed(0)
    model_a = make_model()
    opt_a, sched_a = make_optimizer(model_a, foreach)
    half = N_STEPS // 2 + 1  # inside the spikes' aftermath
    train(model_a, opt_a, sched_a, 0, half)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()}, buf)
    del model_a, opt_a, sched_a
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model_b = make_model(seed=123)  # different init: everything must come from the checkpoint
    opt_b, sched_b = make_optimizer(model_b, foreach)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    train(model_b, opt_b, sched_b, half, N_STEPS)

    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq", "rms"):
            assert torch.equal(opt.state[p][key], opt_b.state[q][key]), key
        assert opt_b.state[q]["step"].device.type == "cpu"
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt_b.param_groups]


def test_foreach_matches_per_tensor_mixed_dtypes_and_step_counts():
    """Mixed dtypes in one group (several foreach buckets), a param that only sometimes has a grad
    (its own step count), one that never has one, and an empty one."""

    def params():
        torch.manual_seed(0)
        return [
            nn.Parameter(torch.randn(7, 5)),
            nn.Parameter(torch.randn(5).bfloat16()),
            nn.Parameter(torch.randn(3, 3).half()),
            nn.Parameter(torch.randn(6)),  # grad only on even steps
            nn.Parameter(torch.randn(4)),  # never a grad
            nn.Parameter(torch.randn(0, 3)),  # empty
        ]

    runs = []
    for foreach in (False, True):
        ps = params()
        opt = StableAdamW(ps, lr=1e-2, weight_decay=0.1, clip_threshold=0.8, foreach=foreach)
        gen = torch.Generator().manual_seed(7)
        for step in range(40):
            for i, p in enumerate(ps):
                if i == 4 or (i == 3 and step % 2):
                    p.grad = None
                    continue
                g = torch.randn(p.shape, generator=gen) * (SPIKE if step == 20 else 1.0)
                p.grad = g.to(p.dtype)
            opt.step()
        runs.append((ps, opt))
    (ps_a, opt_a), (ps_b, opt_b) = runs
    for p, q in zip(ps_a, ps_b):
        assert torch.equal(p, q)
        if p.grad is not None or p.numel() == 6:
            for key in ("step", "exp_avg", "exp_avg_sq", "rms"):
                assert torch.equal(opt_a.state[p][key], opt_b.state[q][key]), key
    assert opt_a.state[ps_a[0]]["step"].item() == 40 and opt_a.state[ps_a[3]]["step"].item() == 20
    assert opt_a.state[ps_a[5]]["rms"].item() == 0.0  # empty tensor: RMS 0, not NaN


@pytest.mark.parametrize("foreach", [False, True])
def test_param_without_grad_is_untouched_and_own_step_count_matches_reference(foreach):
    torch.manual_seed(0)
    used = nn.Parameter(torch.randn(4, 3))
    late = nn.Parameter(torch.randn(3))  # gets a grad from step 5 on
    unused = nn.Parameter(torch.randn(3))  # requires grad, never gets one
    frozen = nn.Parameter(torch.randn(3), requires_grad=False)
    before_unused, before_frozen = unused.detach().clone(), frozen.detach().clone()
    opt = StableAdamW([used, late, unused, frozen], lr=1e-2, weight_decay=0.1, foreach=foreach)
    ref = RefStableAdamW()
    ref_late = late.detach().double().clone()
    for step in range(30):
        x = torch.randn(3)
        loss = (used @ x).square().sum() + ((late * x).sum() if step >= 5 else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step >= 5:
            ref_late, _, _ = ref.step(
                "late",
                ref_late,
                late.grad,
                lr=1e-2,
                betas=(0.9, 0.99),
                eps=1e-6,
                weight_decay=0.1,
                clip_threshold=1.0,
            )
        opt.step()
    assert torch.equal(unused, before_unused) and torch.equal(frozen, before_frozen)
    assert unused not in opt.state and frozen not in opt.state
    assert opt.state[late]["step"].item() == 25
    assert rel_err(late, ref_late) <= REL_TOL


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state(dtype, foreach):
    torch.manual_seed(0)
    model = make_model(dtype=dtype)
    opt, sched = make_optimizer(model, foreach)
    ref = RefStableAdamW()
    ulp = torch.finfo(dtype).eps
    for step in range(N_STEPS):
        compute_grads(model, step)
        expected = {}
        for group in opt.param_groups:
            for p in group["params"]:
                # teacher-forced: the fp64 rule applied to the current low-precision param
                expected[p], _, _ = ref.step(
                    p,
                    p.detach(),
                    p.grad,
                    lr=group["lr"],
                    betas=group["betas"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    clip_threshold=group["clip_threshold"],
                )
        opt.step()
        sched.step()
        for p in model.parameters():
            st = opt.state[p]
            assert p.dtype == dtype
            assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == st["rms"].dtype == torch.float32
            assert rel_err(st["exp_avg"], ref.state[p]["v"]) <= REL_TOL
            assert rel_err(st["exp_avg_sq"], ref.state[p]["u"]) <= REL_TOL
            # computed in fp32, rounded once to the param's dtype: within one ulp of the fp64 result
            err = (p.detach().double() - expected[p]).abs()
            assert (err <= ulp * expected[p].abs() + torch.finfo(dtype).tiny).all(), (step, err.max())

        if step == N_STEPS // 2:
            # a round trip keeps the fp32 state in fp32 (the base class would cast it to the param dtype)
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            fresh, _ = make_optimizer(model, foreach)
            fresh.load_state_dict(torch.load(buf, weights_only=True))
            for p in model.parameters():
                for key in ("exp_avg", "exp_avg_sq", "rms"):
                    assert fresh.state[p][key].dtype == torch.float32
                    assert torch.equal(fresh.state[p][key], opt.state[p][key])
                    assert fresh.state[p][key].data_ptr() != opt.state[p][key].data_ptr()


@pytest.mark.parametrize("foreach", [False, True])
def test_grad_scaler_skips_inf_steps(foreach):
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler needs torch >= 2.3")
    inf_steps = {5, 12}

    torch.manual_seed(0)
    model = make_model()
    opt = StableAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(20):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
        opt.zero_grad(set_to_none=True)
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if step in inf_steps:
            model[0].weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        state_before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
        scaler.step(opt)
        scaler.update()
        if step in inf_steps:
            for p, b in zip(model.parameters(), before):
                assert torch.equal(p, b)
                for k, v in state_before[p].items():
                    assert torch.equal(opt.state[p][k], v), k
        else:
            assert not torch.equal(model[0].weight, before[0])
    assert scaler.get_scale() == 2.0**6  # halved once per inf step

    # The same run without a scaler, skipping the same steps: power-of-two scales unscale exactly.
    torch.manual_seed(0)
    plain = make_model()
    opt_plain = StableAdamW(plain.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
    for step in range(20):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
        opt_plain.zero_grad(set_to_none=True)
        nn.functional.mse_loss(plain(x), y).backward()
        if step not in inf_steps:
            opt_plain.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p]["step"].item() == 20 - len(inf_steps)


@pytest.mark.parametrize("foreach", [False, True])
def test_sparse_grad_raises(foreach):
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    opt = StableAdamW(emb.parameters(), foreach=foreach)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -1e-3},
        {"lr": float("nan")},
        {"betas": (1.0, 0.99)},
        {"betas": (0.9, -0.1)},
        {"betas": (0.9,)},
        {"eps": 0.0},
        {"eps": -1e-8},
        {"weight_decay": -0.1},
        {"clip_threshold": 0.0},
        {"clip_threshold": float("inf")},
        {"foreach": "yes"},
    ],
)
def test_bad_hyperparameters_raise(kwargs):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError):
        StableAdamW([p], **kwargs)
    # the same value set on one param group only
    with pytest.raises(ValueError):
        StableAdamW([{"params": [p], **kwargs}])


def test_no_host_sync_meta_device():
    """A meta tensor holds no data, so .item(), bool() or Python max on one raises: a step that runs
    on meta reads nothing back from the device (the CUDA no-sync property, checked without a GPU)."""
    torch.manual_seed(0)
    for foreach in (False, True):
        ps = [nn.Parameter(torch.empty(5, 4, device="meta")), nn.Parameter(torch.empty(3, device="meta"))]
        opt = StableAdamW(ps, weight_decay=0.1, foreach=foreach)
        for _ in range(2):
            for p in ps:
                p.grad = torch.empty_like(p)
            opt.step()
        st = opt.state[ps[0]]
        assert st["rms"].device.type == "meta" and st["rms"].dim() == 0
        assert st["step"].device.type == "cpu" and st["step"].item() == 2


def test_foreach_none_picks_per_tensor_on_cpu(monkeypatch):
    torch.manual_seed(0)
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(
        stable_adamw_module,
        "_foreach_stable_adamw",
        spy("foreach", stable_adamw_module._foreach_stable_adamw),
    )
    monkeypatch.setattr(
        stable_adamw_module,
        "_single_tensor_stable_adamw",
        spy("single", stable_adamw_module._single_tensor_stable_adamw),
    )
    p = nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    StableAdamW([p]).step()
    StableAdamW([p], foreach=True).step()
    assert calls == ["single", "foreach"]


def test_closure_returns_loss():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3))
    opt = StableAdamW([p])

    def closure():
        opt.zero_grad()
        loss = p.square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0 and opt.state[p]["step"].item() == 1


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_gradient_entries_stay_finite_at_the_smallest_eps(foreach):
    """RMS floors u at eps^2: an entry whose gradient (and so u) is 0 adds 0 / eps^2 = 0. The state is
    fp32, so an eps whose square is not a normal fp32 number must be refused (its floor would round to
    0 and 0 / 0 would turn every parameter NaN); the smallest one accepted gives the fp64 rule."""
    with pytest.raises(ValueError, match="eps"):
        StableAdamW([nn.Parameter(torch.ones(3))], eps=1e-25)
    eps = 2.0**-63  # eps^2 = 2**-126, the smallest normal fp32 number
    p = nn.Parameter(torch.linspace(-1.0, 1.0, 40))
    opt = StableAdamW([p], lr=1e-2, eps=eps, foreach=foreach)
    ref, theta = RefStableAdamW(), p.detach().double().clone()
    for step in range(3):
        p.grad = torch.zeros(40)
        p.grad[: 5 + step] = torch.randn(5 + step)
        theta, rms, _ = ref.step(p, theta, p.grad, lr=1e-2, betas=(0.9, 0.99), eps=eps, weight_decay=0.0,
                                 clip_threshold=1.0)
        opt.step()
        assert math.isfinite(opt.state[p]["rms"].item())
        assert abs(opt.state[p]["rms"].item() - rms) <= 1e-5 * rms
        assert rel_err(p.detach(), theta) <= 1e-6
