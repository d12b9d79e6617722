"""StableAdamW on fp64 parameters: fp64 state and fp64 arithmetic, against the fp64 rule.

The reference is tests/test_optim.py's RefStableAdamW, written from the update rule in the docstring
(the paper's), in float64, without lowbit. Rounding the update through fp32 would leave errors near
1e-7; in fp64 they stay near 1e-15.
"""

import pytest
import torch

from lowbit.optim import StableAdamW
from tests.test_optim import RefStableAdamW, rel_err

HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.1, "clip_threshold": 1.0}


def _params():
    # values fp32 cannot hold, and an odd-sized tensor next to a matrix
    return [torch.randn(7, 5, dtype=torch.float64) / 3, torch.randn(11, dtype=torch.float64) / 7]


@pytest.mark.parametrize("foreach", [False, True])
def test_fp64_params_follow_the_fp64_rule(foreach):
    params = [p.requires_grad_() for p in _params()]
    ref_thetas = [p.detach().clone() for p in params]
    opt = StableAdamW(params, foreach=foreach, **HYPER)
    ref = RefStableAdamW()
    worst = 0.0
    for step in range(30):
        grads = [torch.randn_like(p) * (50.0 if step == 10 else 1.0) for p in params]  # a spike clips
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            ref_thetas[i], rms, _ = ref.step(i, ref_thetas[i], g, **HYPER)
            worst = max(worst, rel_err(p.detach(), ref_thetas[i]))
            assert opt.state[p]["rms"].item() == pytest.approx(rms, rel=1e-12)
    for p in params:
        state = opt.state[p]
        assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "rms")} == {torch.float64}
    assert worst < 1e-12, worst


@pytest.mark.parametrize("foreach", [False, True])
def test_fp64_lr_zero_step_moves_nothing(foreach):
    params = [p.requires_grad_() for p in _params()]
    before = [p.detach().clone() for p in params]
    opt = StableAdamW(params, foreach=foreach, **{**HYPER, "lr": 0.0})
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_fp64_state_survives_a_state_dict_round_trip():
    params = [p.requires_grad_() for p in _params()]
    opt = StableAdamW(params, **HYPER)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    fresh = StableAdamW(params, **HYPER)
    fresh.load_state_dict(saved)
    for p in params:
        assert fresh.state[p]["exp_avg_sq"].dtype == torch.float64
        assert torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
