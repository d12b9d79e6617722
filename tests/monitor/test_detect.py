"""Detection of injected spikes, linking of loss spikes to earlier RMS spikes, and no false alarms."""

import math

import numpy as np
import pytest
import torch

from lowbit.monitor import RobustThreshold, SpikeMonitor
from lowbit.monitor.detector import RobustDetector

from .helpers import TinyNet, regression_batches, train_step


def _run(opt_cls=torch.optim.AdamW, *, n_steps=150, lr=1e-3, grad_scale=None, loss_scale=None, **mon_kwargs):
    """Trains TinyNet; grad_scale / loss_scale map a step to an injected gradient / loss multiplier."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = opt_cls(model.parameters(), lr=lr, betas=(0.9, 0.99))
    mon = SpikeMonitor(model, opt, **mon_kwargs)
    for step, (x, y) in enumerate(regression_batches(n_steps, batch=32), start=1):
        loss = train_step(model, opt, x, y, grad_scale=(grad_scale or {}).get(step))
        mon.step(loss * (loss_scale or {}).get(step, 1.0))
        opt.zero_grad(set_to_none=True)
    return mon


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.Adam])
@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_smooth_run_raises_nothing(opt_cls, lr):
    mon = _run(opt_cls, n_steps=250, lr=lr)
    assert mon.events == []


def test_injected_loss_spike():
    mon = _run(loss_scale={120: 20.0})
    assert [(e["step"], e["kind"]) for e in mon.events] == [(120, "loss_spike")]
    event = mon.events[0]
    assert event["value"] == mon.history_loss[119]
    assert event["threshold"] < event["value"]
    assert event["action"] == "log" and event["preceded_by"] == []


def test_injected_rms_spike_in_one_layer():
    # A 100x gradient in one layer outruns u (beta2 = 0.99): RMS jumps there and only there.
    mon = _run(grad_scale={80: {"embed.weight": 100.0}})
    at_80 = [e for e in mon.events if e["step"] == 80]
    assert [(e["kind"], e["layer"]) for e in at_80] == [("rms_spike", "embed.weight")]
    assert at_80[0]["value"] > 3.0 and at_80[0]["value"] > at_80[0]["threshold"]
    assert not [e for e in mon.events if e["step"] < 80]


def test_absolute_rms_threshold():
    # With no history requirement met (min_history = window), only the absolute threshold applies.
    rms = RobustThreshold(window=500, min_history=500, abs_threshold=3.0)
    mon = _run(grad_scale={20: {"head.weight": 100.0}}, n_steps=25, rms=rms)
    hits = [(e["step"], e["layer"]) for e in mon.events if e["kind"] == "rms_spike"]
    assert (20, "head.weight") in hits and all(e["threshold"] == 3.0 for e in mon.events)


def test_nonfinite_loss():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = SpikeMonitor(model, opt)
    for step, (x, y) in enumerate(regression_batches(60), start=1):
        loss = train_step(model, opt, x, y)
        mon.step({30: float("nan"), 31: torch.tensor(float("inf")), 40: -math.inf}.get(step, loss))
        opt.zero_grad()
    kinds = [(e["step"], e["kind"]) for e in mon.events]
    assert kinds == [(30, "nonfinite_loss"), (31, "nonfinite_loss"), (40, "nonfinite_loss")]
    assert math.isnan(mon.events[0]["value"]) and mon.events[1]["value"] == math.inf
    # Non-finite losses stay out of the history: the loss statistics after them are unharmed.
    assert not [e for e in mon.events if e["kind"] == "loss_spike"]


def test_loss_spikes_link_to_preceding_rms_spikes():
    # RMS spike at 80 (embed.weight); loss spikes injected at 80 (same step: not linked, the loss was
    # computed before update 80), 84 (linked) and 95 (15 steps later: not linked).
    mon = _run(grad_scale={80: {"embed.weight": 100.0}}, loss_scale={80: 50.0, 84: 50.0, 95: 50.0})
    spikes = {e["step"]: e for e in mon.events if e["kind"] == "loss_spike"}
    assert {80, 84, 95} <= set(spikes)
    assert not any(p["step"] == 80 for p in spikes[80]["preceded_by"])
    linked = [(p["step"], p["layer"]) for p in spikes[84]["preceded_by"]]
    assert (80, "embed.weight") in linked
    assert all(76 <= p["step"] <= 83 for p in spikes[84]["preceded_by"])
    rms_80 = next(e for e in mon.events if e["kind"] == "rms_spike" and e["step"] == 80)
    assert {"step": 80, "layer": "embed.weight", "value": rms_80["value"]} in spikes[84]["preceded_by"]
    assert all(87 <= p["step"] <= 94 for p in spikes[95]["preceded_by"])
    assert mon.summary()["loss_spikes_preceded"] >= 1


def test_robust_detector_flags_outliers_only():
    rng = np.random.default_rng(0)
    det = RobustDetector(RobustThreshold(window=30, k=6.0, min_history=10, rel_floor=0.0), 2)
    flags = []
    for t in range(200):
        values = 1.0 + 0.05 * rng.standard_normal(2)
        if t == 150:
            values[1] = 3.0
        spike, _ = det.update(values, np.array([True, t % 2 == 0]))
        flags.append(spike)
    flags = np.array(flags)
    assert flags.sum() == 1 and flags[150, 1]


@pytest.mark.parametrize("bad", [
    {"window": 1}, {"min_history": 0}, {"k": 0}, {"rel_floor": -1},
    # NaN settings would make every threshold NaN and silently flag nothing.
    {"k": float("nan")}, {"k": float("inf")}, {"rel_floor": float("nan")}, {"floor": float("nan")},
    {"abs_threshold": float("nan")},
])
def test_threshold_validation(bad):
    with pytest.raises(ValueError):
        RobustThreshold(**bad)
