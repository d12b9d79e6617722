"""QuantHealth: per-layer SQNR sampled during training, logged with the SpikeMonitor's records,
and an outlier weight that appears mid-run flagged by layer name."""

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.monitor import QuantHealth, SpikeMonitor, read_jsonl


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(256, 768)
        self.fc2 = nn.Linear(768, 256)
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.weight, std=0.02)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def run(to, steps, *, every, outlier_at=None, jsonl=None):
    torch.manual_seed(0)
    kwargs = {} if to is None else {"to": to}
    model = lowbit.swap(Mlp(), filter_fn=lambda m, n: True, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mon = SpikeMonitor(model, optimizer, jsonl=jsonl)
    health = QuantHealth(model, every=every, monitor=mon)
    for step in range(1, steps + 1):
        if step == outlier_at:
            with torch.no_grad():
                model.fc2.weight[3, 7] = 2.0  # what trunc_normal_(std=.02) can leave behind
        x = torch.randn(64, 256)
        with health.measure():
            loss = (model(x) - x).square().mean()
            loss.backward()
        optimizer.step()
        mon.step(loss)
        optimizer.zero_grad(set_to_none=True)
    mon.close()
    return health


def test_outlier_mid_run_is_flagged_by_name_with_the_tensor_wise_variant(tmp_path):
    path = tmp_path / "monitor.jsonl"
    with pytest.warns(RuntimeWarning, match=r"step 5: .*fc2.weight \(forward"):
        health = run("switchback", 6, every=2, outlier_at=4, jsonl=path)
    assert {e["step"] for e in health.events} == {5}  # sampled at 1, 3, 5; the outlier came at 4
    assert {e["layer"] for e in health.events} == {"fc2.weight"}
    low = next(e for e in health.events if e["pass"] == "forward")
    assert low["value"] < 20 <= health.last["fc1.weight"]["forward"]
    records = [r for r in read_jsonl(path) if "quant_sqnr" in r]
    assert [r["step"] for r in records] == [1, 3, 5]
    assert records[0]["quant_sqnr"]["fc2.weight"]["forward"] > 30
    assert records[0]["quant_sqnr"]["fc2.weight"]["grad_input"] > 30
    assert records[-1]["events"][0]["kind"] == "low_quant_sqnr"


def test_default_recipe_stays_healthy_through_the_outlier():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        health = run(None, 3, every=1, outlier_at=2)
    assert not health.events
    assert all(db >= 30 for passes in health.last.values() for db in passes.values()), health.last


def test_steps_between_samples_run_nothing_extra():
    model = lowbit.swap(Mlp(), filter_fn=lambda m, n: True)
    health = QuantHealth(model, every=3)
    seen = []
    for _ in range(7):
        with health.measure() as recorder:
            seen.append(recorder is not None)
            model(torch.randn(4, 256)).sum().backward()
        assert "linear" not in model.fc1.__dict__  # the wrapper is gone after the step
    assert seen == [True, False, False, True, False, False, True]
