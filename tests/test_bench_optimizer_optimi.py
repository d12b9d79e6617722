"""benchmarks/bench_optimizer.py: torch-optimi's StableAdamW is told not to take its Triton path on
the CPU (with triton installed it otherwise fails there with "0 active drivers")."""

from __future__ import annotations

import types

import torch

from benchmarks import bench_optimizer


class _RecordingStableAdamW:
    """Stands in for optimi.StableAdamW with its signature: records the options it was given."""

    calls: list[dict] = []

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-6, triton=None, foreach=None):
        type(self).calls.append({"triton": triton, "lr": lr, "weight_decay": weight_decay})


def test_optimi_on_cpu_gets_triton_false(monkeypatch):
    fake = types.SimpleNamespace(StableAdamW=_RecordingStableAdamW)
    monkeypatch.setattr(bench_optimizer, "optional_import", lambda name, hint: fake)
    _RecordingStableAdamW.calls = []
    bench_optimizer.IMPLS["optimi-stableadamw"]([torch.nn.Parameter(torch.zeros(3))])
    assert _RecordingStableAdamW.calls == [{"triton": False, "lr": 1e-4, "weight_decay": 0.1}]


def test_optimi_without_a_triton_option_still_builds(monkeypatch):
    calls = []

    class OldStableAdamW:
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-6):
            calls.append(lr)

    fake = types.SimpleNamespace(StableAdamW=OldStableAdamW)
    monkeypatch.setattr(bench_optimizer, "optional_import", lambda name, hint: fake)
    bench_optimizer.IMPLS["optimi-stableadamw"]([torch.nn.Parameter(torch.zeros(3))])
    assert calls == [1e-4]
