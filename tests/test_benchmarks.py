"""Smoke test of benchmarks/: the "smoke" preset (every benchmark, tiny shapes) writes well-formed
records, a report and plots. No timing is asserted: figures from a test run mean nothing."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from benchmarks import bench_optimizer, report, run_all
from benchmarks.common import RECORD_FIELDS, Skip, optional_import, read_jsonl

LOWBIT_IMPLS = ("nn.Linear", "switchback", "switchback-row", "switchback-memeff",
                "lowbit-fp8-tensorwise", "lowbit-fp8-switchback", "lowbit-stableadamw",
                "lowbit-stableadamw-per-tensor", "copy", "torch-ref", "triton", "torch.mm")


def _missing_peer(params):
    return optional_import("lowbit_no_such_package", "pip install lowbit-no-such-package")


def _broken_peer(params):
    raise RuntimeError("this peer is broken on purpose")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One run of the smoke preset, with a missing and a broken optimizer added to the peers."""
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(bench_optimizer.IMPLS, "missing-peer", _missing_peer)
        mp.setitem(bench_optimizer.IMPLS, "broken-peer", _broken_peer)
        run_all.main(["--preset", "smoke", "--out", str(out), "--quiet"])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, rows


def test_rows_have_the_record_fields(smoke_run):
    _, rows = smoke_run
    assert rows
    for row in rows:
        assert set(row) == set(RECORD_FIELDS)
        assert row["status"] in ("ok", "skipped", "error")
        assert row["device"] and row["torch"] and row["commit"] and row["dtype"]
    assert {row["bench"] for row in rows} == set(run_all.BENCHES)


def test_ok_rows_have_medians_spread_and_derived_figures(smoke_run):
    _, rows = smoke_run
    ok = [r for r in rows if r["status"] == "ok"]
    for bench in run_all.BENCHES:
        assert any(r["bench"] == bench for r in ok), f"no measurement from {bench}"
    for r in ok:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["speedup"] is None or r["speedup"] > 0
    linear = [r for r in ok if r["bench"] == "linear"]
    assert all(r["tflops"] > 0 and r["baseline"] == "nn.Linear" for r in linear)
    assert all(r["speedup"] == 1.0 for r in linear if r["impl"] == "nn.Linear")
    assert any(r["impl"] == "switchback" and r["speedup"] is not None for r in linear)
    # Every implementation computes the layer: its output is close to nn.Linear's. (fp8 rows run
    # only on fp8 GPUs; e4m3 carries 3 mantissa bits, so a bf16 MLP lands near 0.05 against ~0.01 for int8.)
    for r in linear:
        bound = 0.1 if "fp8" in r["impl"] else 0.05
        assert r["extra"]["rel_err_vs_baseline"] < bound, (r["impl"], r["case"], r["extra"])
    assert all(r["gbps"] > 0 for r in ok if r["bench"] in ("optimizer",) or r["impl"] == "copy")
    assert all(r["samples_per_s"] > 0 for r in ok if r["bench"] == "clip_step")


def test_missing_and_broken_peers_are_recorded_not_raised(smoke_run):
    _, rows = smoke_run
    by_impl = {r["impl"]: r for r in rows if r["bench"] == "optimizer"}
    missing, broken = by_impl["missing-peer"], by_impl["broken-peer"]
    assert missing["status"] == "skipped" and "not installed" in missing["reason"]
    assert broken["status"] == "error" and "broken on purpose" in broken["reason"]
    for r in rows:
        if r["status"] != "ok":
            assert r["reason"] and r["median_ms"] is None
    if not torch.cuda.is_available():  # Triton kernels and fp8 are timed only on a GPU
        skipped = {r["impl"] for r in rows if r["status"] == "skipped"}
        assert {"triton", "torchao-fp8-tensorwise"} <= skipped


def test_lowbit_implementations_do_not_error(smoke_run):
    """Peers may fail on some machines (recorded as errors); lowbit's own paths must not."""
    _, rows = smoke_run
    errors = [(r["bench"], r["case"], r["impl"], r["reason"]) for r in rows
              if r["status"] == "error" and r["impl"] in LOWBIT_IMPLS]
    assert not errors


# Peers that come with `pip install -e ".[dev]"`, by the module they need.
INSTALLED_PEERS = {
    "torchao-int8-mp": "torchao",
    "bnb-llm.int8": "bitsandbytes",
    "optimi-stableadamw": "optimi",
    "pytorch_optimizer-stableadamw": "pytorch_optimizer",
}


def test_installed_peers_are_measured(smoke_run):
    """A peer whose package is installed must be timed, not skipped or failed: a skip here would
    hide a broken comparison behind 'missing'."""
    _, rows = smoke_run
    for impl, module in INSTALLED_PEERS.items():
        if importlib.util.find_spec(module) is None:
            continue
        statuses = {(r["status"], r["reason"]) for r in rows if r["impl"] == impl}
        assert statuses == {("ok", "")}, (impl, statuses)


def test_report_and_plots_are_written(smoke_run):
    out, rows = smoke_run
    text = (out / "report.md").read_text()
    assert text.startswith("# lowbit benchmarks")
    assert rows[0]["device"] in text and rows[0]["commit"] in text
    assert "## Targets" in text and "## Linear layers" in text and "## Skipped and failed" in text
    if not torch.cuda.is_available():
        assert "not the target" in text
    pngs = sorted(out.glob("*.png"))
    assert pngs
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_report_rebuilds_from_results(smoke_run, tmp_path):
    out, _ = smoke_run
    for name in ("results.jsonl", "env.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    report.main([str(tmp_path)])
    assert (tmp_path / "report.md").read_text().startswith("# lowbit benchmarks")
    records = read_jsonl(tmp_path / "results.jsonl")
    assert [dataclasses.asdict(r) for r in records] == [json.loads(x) for x in (out / "results.jsonl").open()]


def test_full_preset_covers_the_issue_shapes():
    settings = run_all.make_settings("full", torch.device("cpu"))
    assert settings.dims == (768, 1024, 1280, 1664, 2048, 4096)
    assert settings.tokens == (8192, 16384, 32768, 65536)
    assert set(settings.passes) == {"fwd", "bwd", "fwd+bwd"}
    assert {"ViT-B", "ViT-H"} == set(settings.optim_sets)
    assert [m for m, _ in settings.clip_models] == ["ViT-B-32", "ViT-L-14", "ViT-H-14"]
    assert run_all.parse_args(["--quick"]).preset == "quick"
    with pytest.raises(ValueError):
        run_all.make_settings("huge", torch.device("cpu"))


def test_gpu_quick_preset_is_the_headline_cases():
    settings = run_all.make_settings("gpu-quick", torch.device("cpu"))
    assert settings.dims == (1024, 1280, 4096) and settings.tokens == (32768,)
    assert settings.passes == ("fwd+bwd",)
    assert set(settings.linear_kinds) == {"layer d->4d", "layer 4d->d"}
    assert settings.optim_sets == ("ViT-B",) and [m for m, _ in settings.clip_models] == ["ViT-B-32"]
    assert run_all.parse_args(["--preset", "gpu-quick"]).preset == "gpu-quick"


def test_skip_is_an_exception_with_its_reason():
    with pytest.raises(Skip, match="not installed"):
        optional_import("lowbit_no_such_package", "pip install nothing")


def test_triton_rows_call_the_kernels_with_the_right_arguments(monkeypatch):
    """The GPU-only "triton" rows, run once under Triton's interpreter on a tiny shape: on a CPU
    this checks how the benchmark calls lowbit.kernels, not how fast they are."""
    if not torch.cuda.is_available():
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("LOWBIT_BENCH_INTERPRET", "1")
    from benchmarks import bench_quantize
    from benchmarks.common import Recorder, TimerConfig, collect_env

    settings = dataclasses.replace(
        run_all.make_settings("smoke", torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        quant_shapes=((40, 24),), impls=("triton",),
        timer=TimerConfig(warmup_ms=0, rep_ms=0, min_reps=1, max_reps=1),
    )
    rec = Recorder("quantize", collect_env(settings.device), settings.dtype, verbose=False)
    bench_quantize.run(settings, rec)
    triton_rows = [r for r in rec.records if r.impl == "triton"]
    assert len(triton_rows) == len(bench_quantize.QUANTIZE_OPS) + 1
    assert all(r.status == "ok" for r in triton_rows), [(r.case, r.reason) for r in triton_rows]


def test_report_puts_the_roofline_prediction_beside_a_gpu_measurement(smoke_run):
    """On a device the roofline table knows, each single-layer fwd+bwd row gets its predicted time."""
    out, _ = smoke_run
    records = read_jsonl(out / "results.jsonl")
    env = json.loads((out / "env.json").read_text())
    gpu_env = {**env, "device": "NVIDIA H100 80GB HBM3", "device_type": "cuda"}
    text = report.render_markdown(records, gpu_env)
    section = text.split("## Measured against the roofline model")[1]
    measured = [r for r in records if r.status == "ok" and r.case == "layer d->4d fwd+bwd"
                and r.impl in ("nn.Linear", "switchback", "switchback-row", "switchback-memeff")]
    assert measured and all(f"| {r.impl} | {r.median_ms:.3f} |" in section for r in measured)
    assert report.roofline_gpu("NVIDIA H200") == "H200" and report.roofline_gpu("NVIDIA L4") is None
    assert "## Measured against the roofline model" not in report.render_markdown(records, env)  # CPU: none
