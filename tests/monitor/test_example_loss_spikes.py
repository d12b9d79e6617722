"""Smoke test: examples/loss_spikes.py runs end to end at a tiny size and writes sane outputs."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "loss_spikes.py"


def load_example():
    spec = importlib.util.spec_from_file_location("loss_spikes_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_tiny(tmp_path, capsys):
    example = load_example()
    argv = ["--out", str(tmp_path), "--steps", "30", "--switch", "20", "--seeds", "0", "--batch-size", "16"]
    results = example.main(argv)
    assert [r["optimizer"] for r in results] == list(example.OPTIMIZERS)
    for r in results:
        assert math.isfinite(r["final_loss"]) and 0 < r["final_loss"] < 10
        assert r["loss_spike_episodes"] <= r["loss_spike_steps"] <= 30
        assert r["monitor_ms_per_step"] > 0
        stem = f"{r['optimizer']}_seed0"
        for suffix in (".png", "_zoom.png"):
            assert (tmp_path / f"{stem}{suffix}").read_bytes()[:4] == b"\x89PNG"
        lines = (tmp_path / f"{stem}.jsonl").read_text().splitlines()
        assert len(lines) == 30 and json.loads(lines[-1])["step"] == 30
        # The switch to colour makes the zero-initialised chroma weights' RMS jump in conv1.
        assert "conv1.weight" in r["rms_spikes_at_switch"]
    printed = capsys.readouterr().out
    assert "preceded by RMS" in printed and "stable-adamw" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["results"]) == 2
    # Deterministic: the same arguments give the same run.
    again = example.main(argv + ["--optimizers", "adamw"])
    assert again[0]["final_loss"] == results[0]["final_loss"]
