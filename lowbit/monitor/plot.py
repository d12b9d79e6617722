"""One picture of a run: the loss with its spikes marked, above a heat map of per-layer RMS.

The heat map (layers x steps, log colour scale) shows what the paper's figures show: a layer whose
RMS lights up a few steps before the loss jumps. matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lowbit.io import atomic_path


def label_rows(n_layers: int, spike_rows: set[int], every: int) -> list[int]:
    """The heat-map rows to label: every row holding a spike, and every `every`-th row not within
    `every` rows of one (so labels do not collide)."""
    rows = set(spike_rows)
    for i in range(0, n_layers, every):
        if all(abs(i - s) >= every for s in spike_rows):
            rows.add(i)
    return sorted(rows)


def plot_spikes(
    path: str | os.PathLike,
    *,
    steps: Sequence[int],
    losses: Sequence[float],
    layer_names: Sequence[str],
    rms_steps: Sequence[int],
    rms: np.ndarray,
    events: Sequence[dict],
    title: str | None = None,
    step_range: tuple[int, int] | None = None,
) -> Path:
    """Draws the loss curve over the per-layer RMS heat map and writes a PNG atomically.

    Args:
        path: the PNG to write (parent directories are created).
        steps: monitor step of each loss.
        losses: the loss at each step (non-finite ones are marked at the top of the panel).
        layer_names: one name per row of `rms`.
        rms_steps: the step of each column of `rms`.
        rms: shape (len(layer_names), len(rms_steps)); NaN where a layer had no value.
        events: the monitor's events (dicts with `step`, `kind`, `layer`, `value`).
        title: figure title.
        step_range: (first, last) steps to draw, inclusive, to zoom into a spike; None: all.

    Returns:
        The path written.

    Raises:
        ImportError: if matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("SpikeMonitor.plot needs matplotlib: `pip install matplotlib`") from err

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps_a = np.asarray(steps, dtype=np.int64)
    loss_a = np.asarray(losses, dtype=np.float64)
    rms_steps_a = np.asarray(rms_steps, dtype=np.int64)
    rms = np.asarray(rms, dtype=np.float64).reshape(len(layer_names), len(rms_steps_a))
    if step_range is not None:
        lo, hi = step_range
        keep = (steps_a >= lo) & (steps_a <= hi)
        steps_a, loss_a = steps_a[keep], loss_a[keep]
        keep_rms = (rms_steps_a >= lo) & (rms_steps_a <= hi)
        rms_steps_a, rms = rms_steps_a[keep_rms], rms[:, keep_rms]
        events = [e for e in events if lo <= e["step"] <= hi]
    rms_steps = rms_steps_a.tolist()
    n_layers = len(layer_names)

    # A figure object rather than pyplot: no global state, no GUI backend, safe in worker threads.
    heat_h = min(max(2.0, 0.18 * n_layers), 12.0)
    fig = Figure(figsize=(11, 2.8 + heat_h), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_rms = fig.subplots(2, 1, sharex=True, height_ratios=[2.6, heat_h])

    # Loss panel: log scale when the loss is positive, so a spike does not flatten the rest.
    finite = np.isfinite(loss_a)
    ax_loss.plot(steps_a[finite], loss_a[finite], lw=0.9, color="tab:blue", label="loss")
    if finite.any() and (loss_a[finite] > 0).all():
        ax_loss.set_yscale("log")
    by_kind: dict[str, list[dict]] = {}
    for e in events:
        by_kind.setdefault(e["kind"], []).append(e)
    spikes = by_kind.get("loss_spike", [])
    if spikes:
        ax_loss.scatter(
            [e["step"] for e in spikes],
            [e["value"] for e in spikes],
            marker="v",
            s=36,
            color="tab:red",
            zorder=3,
            label=f"loss spike ({len(spikes)})",
        )
    nonfinite = by_kind.get("nonfinite_loss", [])
    if nonfinite:
        # No y value to plot at: mark them along the top edge.
        ax_loss.scatter(
            [e["step"] for e in nonfinite],
            [1.0] * len(nonfinite),
            marker="x",
            s=40,
            color="black",
            transform=ax_loss.get_xaxis_transform(),
            clip_on=False,
            label=f"non-finite loss ({len(nonfinite)})",
        )
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.grid(alpha=0.3)
    if title:
        ax_loss.set_title(title)

    # RMS heat map on a log scale centred on RMS = 1, Adam's healthy value: red where a layer's
    # squared gradients outrun u (the paper's warning sign), blue where they fall behind it.
    positive = rms[np.isfinite(rms) & (rms > 0)]
    if positive.size and len(rms_steps):
        import matplotlib as mpl
        from matplotlib.ticker import FuncFormatter, NullFormatter

        span = max(float(positive.max()), 1.0 / max(float(positive.min()), 1e-3), 4.0)
        step_w = (rms_steps[-1] - rms_steps[0]) / (len(rms_steps) - 1) if len(rms_steps) > 1 else 1
        extent = (rms_steps[0] - step_w / 2, rms_steps[-1] + step_w / 2, n_layers - 0.5, -0.5)
        masked = np.ma.masked_invalid(np.where(rms > 0, rms, np.nan))
        cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="0.55")  # dark grey: no value that step
        im = ax_rms.imshow(
            masked,
            aspect="auto",
            interpolation="nearest",
            cmap=cmap,
            norm=LogNorm(vmin=1.0 / span, vmax=span),
            extent=extent,
        )
        cbar = fig.colorbar(im, ax=ax_rms, label="RMS = sqrt(mean(g² / û))", pad=0.01)
        ticks = [m * 10.0**e for e in range(-3, 3) for m in (1, 2, 5)]
        cbar.set_ticks([t for t in ticks if 1.0 / span <= t <= span])
        cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        cbar.ax.yaxis.set_minor_formatter(NullFormatter())
    rms_events = by_kind.get("rms_spike", [])
    row = {name: i for i, name in enumerate(layer_names)}
    if rms_events:
        ax_rms.scatter(
            [e["step"] for e in rms_events],
            [row.get(e["layer"], math.nan) for e in rms_events],
            s=28,
            facecolors="none",
            edgecolors="black",
            linewidths=1.2,
            zorder=4,
            label=f"RMS spike ({len(rms_events)})",
        )
        ax_rms.legend(loc="upper right", fontsize=8)
    # Red lines carry the loss spikes down into the heat map, to line them up with the layers
    # (only where a run of flagged steps starts, so a long episode does not paint over the map).
    flagged = {e["step"] for e in spikes + nonfinite}
    for step in sorted(s for s in flagged if s - 1 not in flagged):
        ax_rms.axvline(step, color="tab:red", lw=0.9, ls="--", alpha=0.8, zorder=3)
    # Every row while the labels fit (7 pt text, heat_h inches for n_layers rows), else every
    # `every`-th; a row that holds an RMS spike is always labelled (in red), its neighbours then not.
    every = max(1, math.ceil(n_layers * 8.5 / (heat_h * 72)))
    spike_rows = {row[e["layer"]] for e in rms_events if e["layer"] in row}
    labelled = label_rows(n_layers, spike_rows, every)
    ax_rms.set_yticks(labelled)
    ax_rms.set_yticklabels([layer_names[i] for i in labelled], fontsize=7)
    for i, label in zip(labelled, ax_rms.get_yticklabels()):
        if i in spike_rows:
            label.set_color("tab:red")
    ax_rms.set_ylim(n_layers - 0.5, -0.5)
    ax_rms.set_xlabel("step")
    ax_rms.set_ylabel("layer")

    with atomic_path(path) as tmp:  # a reader never sees a half-written PNG
        fig.savefig(tmp, format="png", dpi=110)
    return path
