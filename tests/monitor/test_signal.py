"""Per-layer RMS against an independent fp64 computation of the rule in DESIGN.md / the paper (Sec. 3.4).

The reference keeps its own fp64 second moment from the gradients the model produced (teacher
forcing), so it shares nothing with the optimizer's or the monitor's arithmetic:

    u_t = b2 u_{t-1} + (1 - b2) g_t^2;  u_hat = u_t / (1 - b2^t);  RMS = sqrt(mean(g^2 / max(u_hat, eps^2)))
"""

import math

import numpy as np
import pytest
import torch

from lowbit.monitor import SpikeMonitor

from .helpers import TinyNet, regression_batches, train_step

REL_TOL = 1e-5  # the optimizer's fp32 moments against fp64


class RefRMS:
    def __init__(self, beta2: float, eps: float, *, unbiased: bool = False):
        self.beta2, self.eps, self.unbiased = beta2, eps, unbiased
        self.state: dict[str, dict] = {}

    def update(self, name: str, grad: torch.Tensor) -> float:
        g = grad.double()
        st = self.state.setdefault(name, {"t": 0, "u": torch.zeros_like(g)})
        st["t"] += 1
        t, b2 = st["t"], self.beta2
        if self.unbiased:  # StableAdamW: bias correction folded into the decay rate
            b2_hat = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
            st["u"] = b2_hat * st["u"] + (1 - b2_hat) * g * g
            u_hat = st["u"]
        else:
            st["u"] = b2 * st["u"] + (1 - b2) * g * g
            u_hat = st["u"] / (1 - b2**t)
        return math.sqrt((g * g / u_hat.clamp(min=self.eps**2)).mean().item())


def _optimizer(kind: str, params, beta2: float, eps: float):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=3e-3, betas=(0.9, beta2), eps=eps, weight_decay=0.1)
    if kind == "adam":
        return torch.optim.Adam(params, lr=3e-3, betas=(0.9, beta2), eps=eps)
    if kind == "adamw-foreach":
        return torch.optim.AdamW(params, lr=3e-3, betas=(0.9, beta2), eps=eps, foreach=True)
    if kind == "stable":
        from lowbit.optim import StableAdamW

        return StableAdamW(params, lr=3e-3, betas=(0.9, beta2), eps=eps)
    raise AssertionError(kind)


@pytest.mark.parametrize("foreach", [True, False], ids=["monitor-foreach", "monitor-per-tensor"])
@pytest.mark.parametrize("kind", ["adamw", "adam", "adamw-foreach", "stable"])
def test_rms_matches_fp64_reference(kind, foreach):
    torch.manual_seed(0)
    beta2, eps = 0.99, 1e-8
    model = TinyNet()
    # A frozen parameter the optimizer holds, and `unused` that never gets a gradient.
    model.head.bias.requires_grad_(False)
    opt = _optimizer(kind, model.parameters(), beta2, eps)
    mon = SpikeMonitor(model, opt, foreach=foreach)
    ref = RefRMS(beta2, eps, unbiased=(kind == "stable"))
    names = mon.layer_names
    assert names == [n for n, _ in model.named_parameters()]

    for step, (x, y) in enumerate(regression_batches(40), start=1):
        # Every 7th step the embedding bias gets no gradient: its RMS is missing, its state ages.
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step % 7 == 0:
            model.embed.bias.grad = None
        if step == 25:
            model.embed.weight.grad.mul_(30.0)  # a jump, so RMS is far from 1 somewhere
        opt.step()
        mon.step(loss)
        expected = {n: ref.update(n, p.grad) for n, p in model.named_parameters() if p.grad is not None}
        got = mon.history_rms[:, -1]
        for i, name in enumerate(names):
            if name in expected:
                assert got[i] == pytest.approx(expected[name], rel=REL_TOL), (step, name)
            else:
                assert math.isnan(got[i]), (step, name)
        opt.zero_grad(set_to_none=True)

    rms = mon.history_rms
    assert rms.shape == (len(names), 40)
    # The injected jump shows: embed.weight's RMS at step 25 is far above 1.
    assert rms[names.index("embed.weight"), 24] > 3.0
    # Adam's first step has u_hat = g^2, so RMS is exactly 1 (up to eps).
    assert rms[names.index("embed.weight"), 0] == pytest.approx(1.0, rel=1e-5)


def test_every_computes_rms_on_a_stride():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = SpikeMonitor(model, opt, every=3)
    for x, y in regression_batches(10):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        mon.step(loss)
        opt.zero_grad()
    assert mon.history_rms_steps == [3, 6, 9]
    assert len(mon.history_loss) == 10


def test_rejects_non_adam_optimizer():
    model = TinyNet()
    with pytest.raises(ValueError, match="Adam-family"):
        SpikeMonitor(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="action"):
        SpikeMonitor(model, torch.optim.AdamW(model.parameters()), action="explode")


def test_no_rms_without_an_optimizer_step():
    # GradScaler skips optimizer.step() on an overflow: the gradients hold infs, u has not seen them.
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = SpikeMonitor(model, opt)
    for step, (x, y) in enumerate(regression_batches(30), start=1):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == 20:
            model.embed.weight.grad.fill_(float("inf"))
        else:
            opt.step()
        mon.step(loss)
        opt.zero_grad()
    assert 20 not in mon.history_rms_steps and len(mon.history_rms_steps) == 29
    assert not [e for e in mon.events if e["kind"] == "rms_spike"]


def test_loss_must_be_scalar():
    model = TinyNet()
    mon = SpikeMonitor(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="scalar"):
        mon.step(torch.ones(3))


@pytest.mark.parametrize("bad", [torch.ones(3), "1.5", None, torch.tensor(True), torch.tensor(1 + 1j)])
def test_a_rejected_loss_changes_no_state(bad):
    """A bad loss raises before the step count, the RMS or the optimizer-step flag move on."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = SpikeMonitor(model, opt)
    x, y = next(regression_batches(1))
    loss = train_step(model, opt, x, y)
    with pytest.raises((TypeError, ValueError)):
        mon.step(bad)
    assert mon.step_count == 0
    mon.step(loss)
    assert mon.step_count == 1 and mon.history_rms_steps == [1]


def test_float64_loss_keeps_its_range():
    model = TinyNet()
    mon = SpikeMonitor(model, torch.optim.AdamW(model.parameters()))
    mon.step(torch.tensor(1e39, dtype=torch.float64))
    assert mon.history_loss == [1e39] and not mon.events


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_size_parameter_reads_zero_not_nan(foreach):
    """mean() of an empty tensor is NaN: an empty parameter must not raise an RMS spike every step."""
    torch.manual_seed(0)
    model = TinyNet()
    model.empty = torch.nn.Parameter(torch.zeros(0, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = SpikeMonitor(model, opt, foreach=foreach)
    for x, y in regression_batches(15):
        loss = torch.nn.functional.mse_loss(model(x), y) + model.empty.sum()
        loss.backward()
        opt.step()
        mon.step(loss)
        opt.zero_grad()
    column = mon.history_rms[mon.layer_names.index("empty")]
    assert np.array_equal(column, np.zeros(15, dtype=np.float32))
    assert not mon.events


def test_an_optimizer_without_a_second_moment_is_refused():
    """Adamax has betas and eps but keeps no exp_avg_sq: RMS(g^2/u) cannot be computed."""
    model = TinyNet()
    opt = torch.optim.Adamax(model.parameters())
    mon = SpikeMonitor(model, opt)
    x, y = next(regression_batches(1))
    loss = train_step(model, opt, x, y)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        mon.step(loss)


def test_added_param_groups_are_refused():
    model = TinyNet()
    opt = torch.optim.AdamW([model.embed.weight], lr=1e-3)
    mon = SpikeMonitor(model, opt, action="skip")
    opt.add_param_group({"params": [model.head.weight]})
    with pytest.raises(RuntimeError, match="add_param_group"):
        mon.step(1.0)


def test_a_failing_constructor_leaves_no_optimizer_hooks(tmp_path):
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters())
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        SpikeMonitor(model, opt, action="skip", jsonl=tmp_path / "dir")  # a directory: open() fails
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
