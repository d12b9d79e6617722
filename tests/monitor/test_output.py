"""What the monitor writes: JSONL lines, the PNG, TensorBoard events."""

import json
import math

import pytest
import torch

from lowbit.monitor import SpikeMonitor, read_jsonl

from .helpers import TinyNet, regression_batches, train_step


def _run(tmp_path, n_steps=40, **kwargs):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    with SpikeMonitor(model, opt, **kwargs) as mon:
        for step, (x, y) in enumerate(regression_batches(n_steps), start=1):
            loss = train_step(model, opt, x, y, grad_scale={"embed.weight": 100.0} if step == 30 else None)
            mon.step({33: loss * 50, 36: float("nan")}.get(step, loss))
            opt.zero_grad()
    return mon


def test_jsonl_one_strict_line_per_step(tmp_path):
    path = tmp_path / "run" / "monitor.jsonl"
    mon = _run(tmp_path, jsonl=path)
    lines = path.read_text().splitlines()
    assert len(lines) == 40
    # Strict JSON: no NaN / Infinity tokens anywhere.
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}")) for line in lines]
    assert records == read_jsonl(path)
    assert [r["step"] for r in records] == list(range(1, 41))
    for r, loss in zip(records, mon.history_loss):
        assert r["loss"] == (loss if math.isfinite(loss) else "nan")
        assert list(r["rms"]) == mon.layer_names
        assert r["rms"]["unused.weight"] is None  # never had a gradient
    assert records[0]["rms"]["embed.weight"] == pytest.approx(1.0, rel=1e-5)
    assert records[29]["rms"]["embed.weight"] == pytest.approx(float(mon.history_rms[0, 29]), rel=1e-6)
    # Events are in the line of their step, as in mon.events.
    logged = [e for r in records for e in r["events"]]
    assert [(e["step"], e["kind"]) for e in logged] == [(e["step"], e["kind"]) for e in mon.events]
    kinds = {(e["step"], e["kind"]) for e in logged}
    assert {(30, "rms_spike"), (33, "loss_spike"), (36, "nonfinite_loss")} <= kinds
    spike = next(e for e in logged if e["kind"] == "loss_spike")
    assert {"step": 30, "layer": "embed.weight"}.items() <= spike["preceded_by"][0].items()
    nonfinite = next(e for e in logged if e["kind"] == "nonfinite_loss")
    assert nonfinite["value"] == "nan" and nonfinite["threshold"] is None


def test_png_written(tmp_path):
    pytest.importorskip("matplotlib")
    mon = _run(tmp_path)
    out = mon.plot(tmp_path / "plots" / "spikes.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["spikes.png"]  # no temporary left behind


def test_tensorboard_written(tmp_path):
    pytest.importorskip("tensorboard")
    _run(tmp_path, n_steps=12, tensorboard=tmp_path / "tb")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_no_history_kept(tmp_path):
    mon = _run(tmp_path, n_steps=5, keep_history=False)
    assert mon.history_loss == [] and mon.history_rms.shape == (len(mon.layer_names), 0)
    with pytest.raises(RuntimeError):
        mon.plot(tmp_path / "x.png")


def test_a_new_monitor_never_overwrites_an_existing_jsonl(tmp_path):
    """The default mode ("x") refuses a file that holds lines, saying how to continue or replace it;
    "w" replaces it only when asked; an empty file (a `touch`) is fine."""
    path = tmp_path / "monitor.jsonl"
    old = '{"step": 1, "loss": 1.0, "events": []}\n'
    path.write_text(old)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(FileExistsError, match=r"jsonl_mode='a'.*jsonl_mode='w'"):
        SpikeMonitor(model, opt, jsonl=path)
    assert path.read_text() == old  # untouched
    assert not opt._optimizer_step_post_hooks  # the refused monitor left no hook behind
    with SpikeMonitor(model, opt, jsonl=path, jsonl_mode="w") as mon:
        mon.step(2.0)
    assert [r["loss"] for r in read_jsonl(path)] == [2.0]
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    with SpikeMonitor(model, opt, jsonl=empty) as mon:
        mon.step(3.0)
    assert [r["loss"] for r in read_jsonl(empty)] == [3.0]


def test_quant_health_never_overwrites_an_existing_jsonl(tmp_path):
    from lowbit.monitor import QuantHealth

    path = tmp_path / "health.jsonl"
    path.write_text('{"step": 1, "quant_sqnr": {}, "events": []}\n')
    with pytest.raises(FileExistsError, match="jsonl_mode"):
        QuantHealth(TinyNet(), jsonl=path)
    QuantHealth(TinyNet(), jsonl=path, jsonl_mode="a").close()
    assert len(path.read_text().splitlines()) == 1


@pytest.mark.parametrize("action", ["log", "skip", "rollback"])
def test_step_after_close_is_an_error(action):
    """After close() the hooks are gone: a step could neither see the optimizer step nor undo it."""
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters())
    mon = SpikeMonitor(model, opt, action=action)
    mon.close()
    mon.close()  # twice is fine
    ((x, y),) = regression_batches(1)
    train_step(model, opt, x, y)
    with pytest.raises(RuntimeError, match=r"after close\(\)"):
        mon.step(float("nan"))
