"""Smoke test: examples/fp8_layer_scale.py runs end to end at a tiny size and writes its table and PNG."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fp8_layer_scale.py"


def load_example():
    spec = importlib.util.spec_from_file_location("fp8_layer_scale", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_tiny(tmp_path, capsys):
    example = load_example()
    argv = ["--out", str(tmp_path), "--steps", "3", "--width", "32", "--depth", "1", "--batch-size", "8"]
    argv += ["--warmup", "1"]
    results = example.main(argv)
    assert [r["run"] for r in results] == list(example.RUNS)
    for r in results:
        assert r["steps"] == 3 and len(r["loss_curve"]) == 3 and len(r["feature_curve"]) == 3
        assert r["max_feature"] > 0
    printed = capsys.readouterr().out
    assert "max |feature|" in printed and "fp8-tensorwise + ls0" in printed
    table = json.loads((tmp_path / "fp8_layer_scale.json").read_text())
    assert len(table["results"]) == len(example.RUNS)
    assert (tmp_path / "fp8_layer_scale.png").stat().st_size > 0
    # Deterministic: the same arguments give the same losses.
    again = example.main(argv + ["--runs", "fp8-tensorwise"])
    assert again[0]["loss_curve"] == results[list(example.RUNS).index("fp8-tensorwise")]["loss_curve"]
