"""state_dict / load_state_dict: a run resumed halfway through a torch.save / torch.load(weights_only=True)
round trip into a new monitor raises the same events, takes the same actions and writes the same JSONL."""

import json

import numpy as np
import pytest
import torch

from lowbit.monitor import RobustThreshold, SpikeMonitor

from .helpers import TinyNet, regression_batches, train_step

N_STEPS = 40
# An RMS spike at 18 that the loss spike at 22 links to across the resume at 20 (link_steps = 8); the
# loss spike needs the detector's window from before the resume (min_history = 10).
GRAD_SCALE = {18: {"embed.weight": 100.0}, 26: {"head.weight": 100.0}}
LOSS_SCALE = {22: 30.0, 23: 30.0, 30: float("inf")}


def _make(jsonl, **kwargs):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    mon = SpikeMonitor(model, opt, action="skip", jsonl=jsonl, **kwargs)
    return model, opt, mon


def _train(model, opt, mon, batches, steps):
    for step in steps:
        x, y = batches[step - 1]
        loss = train_step(model, opt, x, y, grad_scale=GRAD_SCALE.get(step))
        mon.step(loss * LOSS_SCALE.get(step, 1.0))
        opt.zero_grad(set_to_none=True)


def test_resumed_run_matches_an_unbroken_one(tmp_path):
    batches = list(regression_batches(N_STEPS))
    model, opt, mon = _make(tmp_path / "straight.jsonl")
    _train(model, opt, mon, batches, range(1, N_STEPS + 1))
    mon.close()
    straight = mon

    # First half, checkpointed at step 20; then, as if killed after step 25, lines 21-25 are in the file.
    path = tmp_path / "resumed.jsonl"
    model, opt, mon = _make(path)
    _train(model, opt, mon, batches, range(1, 21))
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(), "monitor": mon.state_dict()}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    _train(model, opt, mon, batches, range(21, 26))
    mon.close()
    assert len(path.read_text().splitlines()) == 25

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, opt, _ = _make(None)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    mon = SpikeMonitor(model, opt, action="skip", jsonl=path, jsonl_mode="a")
    mon.load_state_dict(ckpt["monitor"])
    assert len(path.read_text().splitlines()) == 20
    _train(model, opt, mon, batches, range(21, N_STEPS + 1))
    mon.close()

    # The run exercises what must survive the resume: the loss spike at 22 is detected and linked to 18.
    decisions = [(e["step"], e["kind"], e["action"]) for e in straight.events]
    assert {(18, "rms_spike", "log"), (26, "rms_spike", "log"), (30, "nonfinite_loss", "skip")} <= set(decisions)
    assert (22, "loss_spike", "skip") in decisions and (23, "loss_spike", "skip") in decisions
    assert next(e for e in straight.events if e["step"] == 22)["preceded_by"][0]["step"] == 18
    assert mon.events == straight.events
    assert path.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))  # the rewrite left no temporary file
    assert mon.step_count == straight.step_count == N_STEPS
    assert mon.history_steps == straight.history_steps and mon.history_rms_steps == straight.history_rms_steps
    np.testing.assert_array_equal(mon.history_loss, straight.history_loss)
    np.testing.assert_array_equal(mon.history_rms, straight.history_rms)
    # The same skips leave the same model and optimizer state.
    for a, b in zip(straight.model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.optimizer.state.values(), opt.state.values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_rollback_snapshots_the_resumed_state(tmp_path):
    model, opt, _ = _make(None)
    mon = SpikeMonitor(model, opt, action="rollback", snapshot_every=5)
    _train(model, opt, mon, list(regression_batches(12)), range(1, 13))
    assert mon.last_snapshot_step == 10
    state = mon.state_dict()
    assert "model" not in state and "optimizer" not in state

    fresh = SpikeMonitor(model, opt, action="rollback", snapshot_every=5, keep_history=False)
    fresh.load_state_dict(state)
    assert fresh.last_snapshot_step == 12 and fresh.history_loss == []
    params = [p.detach().clone() for p in model.parameters()]
    ((x, y),) = regression_batches(1, seed=1)
    train_step(model, opt, x, y)
    assert fresh.step(float("nan"))[0]["action"] == "rollback"
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_load_errors_and_append_mode(tmp_path):
    model, opt, mon = _make(None)
    state = mon.state_dict()
    with pytest.raises(ValueError, match="version"):
        mon.load_state_dict({**state, "version": 0})
    with pytest.raises(ValueError, match="other layers"):
        mon.load_state_dict({**state, "layer_names": state["layer_names"][:-1]})
    other = SpikeMonitor(model, opt, loss=RobustThreshold(window=20))
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="jsonl_mode"):
        SpikeMonitor(model, opt, jsonl=tmp_path / "x.jsonl", jsonl_mode="r")

    # "a" without load_state_dict keeps what is there; load_state_dict drops torn and later lines.
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 1.0, "events": []}\n{"step": 2, "loss": 1.0, "events": []}\n{"step": 3, "lo')
    with SpikeMonitor(model, opt, jsonl=path, jsonl_mode="a") as appending:
        state["step_count"] = 1
        appending.load_state_dict(state)
        appending.step(2.0)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert json.loads(path.read_text().splitlines()[1])["loss"] == 2.0


def test_a_state_that_does_not_fit_changes_nothing():
    """load_state_dict checks everything before it assigns anything."""
    model, opt, mon = _make(None)
    batches = list(regression_batches(N_STEPS))
    _train(model, opt, mon, batches, range(1, 21))
    before = mon.state_dict()
    other_model, other_opt, other = _make(None, rms=RobustThreshold(window=20))
    _train(other_model, other_opt, other, batches, range(1, 6))
    with pytest.raises(ValueError, match="shape"):
        mon.load_state_dict(other.state_dict())  # the loss detector fits, the RMS one does not
    after = mon.state_dict()
    assert after["step_count"] == before["step_count"]
    assert after["loss_detector"]["pos"] == before["loss_detector"]["pos"]
    assert torch.equal(after["loss_detector"]["buf"].nan_to_num(), before["loss_detector"]["buf"].nan_to_num())

    renamed = {**before, "layer_names": ["module." + n for n in before["layer_names"]]}
    with pytest.raises(ValueError, match="'module.embed.weight' saved, 'embed.weight' here"):
        mon.load_state_dict(renamed)


def test_sync_puts_the_lines_on_disk(tmp_path):
    path = tmp_path / "m.jsonl"
    model, opt, mon = _make(path)
    _train(model, opt, mon, list(regression_batches(3)), range(1, 4))
    mon.sync()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    mon.close()
    mon.sync()  # after close: nothing left to sync, and no error


def test_history_tensors_load_from_any_device_or_autograd_state():
    model, opt, mon = _make(None)
    _train(model, opt, mon, list(regression_batches(5)), range(1, 6))
    state = mon.state_dict()
    state["history"] = {k: (v.float().requires_grad_() if k == "rms" else v) for k, v in state["history"].items()}
    mon.load_state_dict(state)
    assert mon.history_rms.shape == (len(mon.layer_names), 5)


def test_tensorboard_reopened_with_purge_step(tmp_path):
    pytest.importorskip("tensorboard")
    model, opt, mon = _make(None, tensorboard=tmp_path / "tb")
    _train(model, opt, mon, list(regression_batches(3)), range(1, 4))
    state = mon.state_dict()
    mon.close()
    model, opt, mon = _make(None, tensorboard=tmp_path / "tb")
    mon.load_state_dict(state)
    mon.step(1.0)
    mon.close()
    assert mon.step_count == 4 and len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) >= 2


def test_append_after_a_torn_last_line_keeps_the_new_line(tmp_path):
    """Mode "a" without load_state_dict (e.g. QuantHealth's own JSONL) after a crash mid-line: the new
    line starts on a line of its own instead of being glued onto the torn one (and lost with it)."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 1.0, "events": []}\n{"step": 2, "lo')
    model, opt, _ = _make(None)
    with SpikeMonitor(model, opt, jsonl=path, jsonl_mode="a") as mon:
        mon.step(5.0)
    from lowbit.monitor import read_jsonl

    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(1, 1.0), (1, 5.0)]
