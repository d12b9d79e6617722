"""The three actions: "log" leaves training alone, "skip" undoes exactly the spiking step,
"rollback" restores exactly the last good snapshot."""

import copy

import pytest
import torch

from lowbit.monitor import SpikeMonitor

from .helpers import TinyNet, regression_batches, train_step


def _state(model, opt):
    """A deep, detached copy of parameters and optimizer state, keyed by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {
        names[id(p)]: copy.deepcopy({k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()})
        for p, st in opt.state.items()
        if st
    }
    return params, state


def _assert_same(a, b):
    params_a, state_a = a
    params_b, state_b = b
    assert params_a.keys() == params_b.keys()
    for n in params_a:
        assert torch.equal(params_a[n], params_b[n]), n
    assert state_a.keys() == state_b.keys()
    for n in state_a:
        assert state_a[n].keys() == state_b[n].keys(), n
        for k in state_a[n]:
            assert torch.equal(torch.as_tensor(state_a[n][k]), torch.as_tensor(state_b[n][k])), (n, k)


def _make(opt_name="adamw"):
    torch.manual_seed(0)
    model = TinyNet()
    if opt_name == "stable":
        from lowbit.optim import StableAdamW

        return model, StableAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))


def test_log_does_not_change_training():
    runs = []
    for monitored in (False, True):
        model, opt = _make()
        mon = SpikeMonitor(model, opt) if monitored else None
        for step, (x, y) in enumerate(regression_batches(40), start=1):
            loss = train_step(model, opt, x, y)
            if mon:
                mon.step(loss * (30.0 if step == 30 else 1.0))
            opt.zero_grad()
        runs.append(_state(model, opt))
    _assert_same(*runs)


@pytest.mark.parametrize("opt_name", ["adamw", "stable"])
def test_skip_restores_the_step_exactly(opt_name):
    model, opt = _make(opt_name)
    mon = SpikeMonitor(model, opt, action="skip")
    skipped = []
    for step, (x, y) in enumerate(regression_batches(40), start=1):
        before = _state(model, opt)
        loss = train_step(model, opt, x, y)
        events = mon.step(loss * (30.0 if step in (25, 26) else 1.0))
        if step in (25, 26):
            assert [(e["kind"], e["action"]) for e in events] == [("loss_spike", "skip")]
            _assert_same(_state(model, opt), before)  # as if optimizer.step() had not run
            skipped.append(step)
        else:
            assert events == []
        opt.zero_grad()
    assert skipped == [25, 26]
    # The undone steps do not count: each parameter has taken 38 steps.
    assert all(float(st["step"]) == 38 for st in opt.state.values())
    mon.close()


def test_skip_first_step_drops_the_new_state_and_nothing_to_undo_is_none():
    model, opt = _make()
    mon = SpikeMonitor(model, opt, action="skip")
    before = _state(model, opt)
    ((x, y),) = regression_batches(1)
    train_step(model, opt, x, y)
    events = mon.step(float("nan"))
    assert events[0]["kind"] == "nonfinite_loss" and events[0]["action"] == "skip"
    _assert_same(_state(model, opt), before)
    assert not any(opt.state.values())
    # No optimizer.step() since the last call (e.g. GradScaler skipped it): nothing is undone.
    assert mon.step(float("inf"))[0]["action"] == "none"
    _assert_same(_state(model, opt), before)


def test_skip_on_rms_spikes():
    model, opt = _make()
    mon = SpikeMonitor(model, opt, action="skip", act_on=("rms_spike",))
    for step, (x, y) in enumerate(regression_batches(60), start=1):
        before = _state(model, opt)
        train_step(model, opt, x, y, grad_scale={"embed.weight": 100.0} if step == 50 else None)
        events = mon.step(1.0)
        if step == 50:
            assert ("rms_spike", "embed.weight", "skip") in [(e["kind"], e["layer"], e["action"]) for e in events]
            _assert_same(_state(model, opt), before)
        opt.zero_grad()


def test_rollback_restores_the_last_snapshot_exactly():
    model, opt = _make()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.99)
    mon = SpikeMonitor(model, opt, action="rollback", snapshot_every=10)
    assert mon.last_snapshot_step == 0
    snapshots = {}
    for step, (x, y) in enumerate(regression_batches(40), start=1):
        loss = train_step(model, opt, x, y)
        spike = step in (25, 27)
        lr_before = opt.param_groups[0]["lr"]
        events = mon.step(loss * (100.0 if spike else 1.0))
        sched.step()
        if step % 10 == 0:
            snapshots[step] = _state(model, opt)
        if spike:
            assert [(e["kind"], e["action"]) for e in events] == [("loss_spike", "rollback")]
            # Both rollbacks land on the step-20 snapshot, bit for bit (the snapshot stayed intact).
            assert mon.last_snapshot_step == 20
            _assert_same(_state(model, opt), snapshots[20])
            # The schedule keeps its clock: lr is not rolled back.
            assert opt.param_groups[0]["lr"] == pytest.approx(lr_before * 0.99)
        opt.zero_grad()
    assert mon.last_snapshot_step == 40


def test_rollback_to_the_initial_state():
    model, opt = _make()
    initial = _state(model, opt)
    mon = SpikeMonitor(model, opt, action="rollback", snapshot_every=1000, snapshot_device=None)
    for step, (x, y) in enumerate(regression_batches(15), start=1):
        train_step(model, opt, x, y)
        mon.step(float("nan") if step == 15 else 1.0)
        opt.zero_grad()
    _assert_same(_state(model, opt), initial)
    # Training goes on from there.
    ((x, y),) = regression_batches(1)
    train_step(model, opt, x, y)
    assert all(float(st["step"]) == 1 for st in opt.state.values())
