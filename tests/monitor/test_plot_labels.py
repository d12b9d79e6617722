"""The spikes plot labels every heat-map row that holds an RMS spike (62 layers used to label only
every second row, so a spike on an odd row read as its neighbour's)."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.monitor.plot import label_rows, plot_spikes


def _drawn_labels(monkeypatch, tmp_path, n_layers: int, spike_rows: list[int]) -> dict[str, str]:
    """Plots a run with RMS spikes on `spike_rows`; returns {y tick label: its colour} of the heat map."""
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    seen = {}
    savefig = Figure.savefig

    def recording_savefig(fig, *args, **kwargs):
        heat = fig.axes[1]
        seen.update({t.get_text(): to_hex(t.get_color()) for t in heat.get_yticklabels()})
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    names = [f"layer{i}" for i in range(n_layers)]
    steps = list(range(1, 21))
    events = [{"step": 10, "kind": "rms_spike", "layer": names[r], "value": 9.0} for r in spike_rows]
    plot_spikes(
        tmp_path / "spikes.png",
        steps=steps,
        losses=[1.0] * 20,
        layer_names=names,
        rms_steps=steps,
        rms=np.ones((n_layers, 20)),
        events=events,
    )
    assert (tmp_path / "spikes.png").stat().st_size > 0
    return seen


def test_62_layers_every_spike_row_labelled(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    labels = _drawn_labels(monkeypatch, tmp_path, 62, [1, 31, 61])
    for r in (1, 31, 61):
        assert labels[f"layer{r}"] == "#d62728", r  # labelled, in red (tab:red)
    assert len(labels) == 62  # 62 rows fit the figure: all labelled


def test_many_layers_label_spike_rows_and_a_stride(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    labels = _drawn_labels(monkeypatch, tmp_path, 300, [7, 151])
    assert labels["layer7"] == labels["layer151"] == "#d62728"
    assert 20 < len(labels) < 300  # too many rows for all labels: a stride plus the spike rows


def test_label_rows_keeps_spike_rows_and_spaces_the_rest():
    assert label_rows(10, set(), 2) == [0, 2, 4, 6, 8]
    assert label_rows(10, {3}, 2) == [0, 3, 6, 8]  # 2 and 4 would touch row 3's label
    assert label_rows(5, {1, 3}, 1) == [0, 1, 2, 3, 4]
