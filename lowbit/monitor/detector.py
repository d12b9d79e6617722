"""Robust spike thresholds: a value is a spike when it rises well above its own recent history.

    scale     = max(1.4826 * MAD, rel_floor * |median|)      # over the last `window` values
    threshold = max(median + k * scale, floor)                # once `min_history` values are known
    spike     = value > threshold  or  value > abs_threshold  or  value is not finite

Median and MAD rather than mean and standard deviation: a spike must not inflate the statistics that
are meant to catch the next one. 1.4826 * MAD estimates the standard deviation of Gaussian noise.
The `rel_floor` keeps a perfectly flat history (MAD = 0) from flagging rounding noise; `floor` sets
a level below which nothing is a spike however quiet the history (for RMS: Adam's updates are
lr-sized while RMS <~ 1, so a jump from 0.1 to 1.5 is harmless).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# MAD -> standard deviation for Gaussian noise.
_MAD_TO_STD = 1.4826


def _nanmedian_cols(a: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Column medians ignoring NaN, given each column's count of non-NaN values (NaN if none).

    np.nanmedian goes through masked arrays and costs ~10x more; sorting puts NaN last, so the
    median of column j sits at rows (count_j - 1) // 2 and count_j // 2.
    """
    s = np.sort(a, axis=0)
    cols = np.arange(a.shape[1])
    lo = s[np.maximum((count - 1) // 2, 0), cols]
    hi = s[np.minimum(count // 2, a.shape[0] - 1), cols]
    return np.where(count > 0, 0.5 * (lo + hi), np.nan)


@dataclass(frozen=True)
class RobustThreshold:
    """How one kind of series (the loss, or each layer's RMS) is judged.

    Args:
        window: number of recent values the median and MAD are taken over.
        k: how many robust standard deviations above the median counts as a spike.
        min_history: values needed before the relative test applies (the absolute one always does).
        rel_floor: lower bound on the scale, as a fraction of |median|.
        floor: the relative test never flags a value at or below this.
        abs_threshold: a value above this is a spike whatever the history; None: no absolute test.
    """

    window: int = 50
    k: float = 6.0
    min_history: int = 10
    rel_floor: float = 0.01
    floor: float = -math.inf
    abs_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"window must be >= 2, got {self.window}")
        if not 1 <= self.min_history <= self.window:
            raise ValueError(f"min_history must be in [1, window={self.window}], got {self.min_history}")
        # NaN compares False with everything: a NaN setting would make the threshold NaN and
        # silently flag nothing, so each must be a real number (written so NaN fails the test).
        if not 0 < self.k < math.inf:
            raise ValueError(f"k must be finite and > 0, got {self.k}")
        if not 0 <= self.rel_floor < math.inf:
            raise ValueError(f"rel_floor must be finite and >= 0, got {self.rel_floor}")
        if math.isnan(self.floor) or self.floor == math.inf:
            raise ValueError(f"floor must be a number below inf (-inf: no floor), got {self.floor}")
        if self.abs_threshold is not None and math.isnan(self.abs_threshold):
            raise ValueError("abs_threshold must be a number or None, got nan")


class RobustDetector:
    """Judges `n` parallel series at once (one numpy call per step, not one per layer).

    History lives in a ring buffer of shape (window, n) over the last `window` steps; NaN marks "no
    value", so a series that misses steps (a parameter without a gradient) just has fewer values.
    """

    def __init__(self, config: RobustThreshold, n: int) -> None:
        self.config = config
        self._buf = np.full((config.window, n), np.nan, dtype=np.float64)
        self._pos = 0

    def thresholds(self) -> np.ndarray:
        """The current threshold of every series (inf where neither test applies yet)."""
        cfg = self.config
        count = np.sum(~np.isnan(self._buf), axis=0)
        median = _nanmedian_cols(self._buf, count)
        mad = _nanmedian_cols(np.abs(self._buf - median), count)
        scale = np.maximum(_MAD_TO_STD * mad, cfg.rel_floor * np.abs(median))
        rel = np.where(count >= cfg.min_history, np.maximum(median + cfg.k * scale, cfg.floor), np.inf)
        if cfg.abs_threshold is not None:
            rel = np.minimum(rel, cfg.abs_threshold)
        return rel

    def update(self, values: np.ndarray, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Judges `values` against the history, then adds the finite ones to it.

        Args:
            values: shape (n,).
            present: shape (n,) bool; False marks series with no value this step (never a spike).

        Returns:
            (spike, threshold): bool flags and the thresholds they were judged against.
        """
        values = np.asarray(values, dtype=np.float64)
        if present is None:
            present = np.ones(values.shape, dtype=bool)
        threshold = self.thresholds()
        finite = np.isfinite(values)
        with np.errstate(invalid="ignore"):
            spike = present & (~finite | (values > threshold))
        # Spikes enter the history too: the median shrugs off a few of them, and a lasting shift in
        # level (a new data mix, a learning-rate change) then stops being flagged after ~window/2 steps.
        self._buf[self._pos] = np.where(present & finite, values, np.nan)
        self._pos = (self._pos + 1) % self.config.window
        return spike, threshold

    def state_dict(self) -> dict:
        """The history ring buffer (a float64 tensor, NaN for "no value") and its write position."""
        return {"buf": torch.from_numpy(self._buf.copy()), "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()`'s history.

        Raises:
            ValueError: if the saved history has another shape (window, series) than this detector's.
        """
        buf = state["buf"].detach().cpu().numpy().astype(np.float64)
        if buf.shape != self._buf.shape:
            raise ValueError(
                f"saved detector history has shape (window, series) = {tuple(buf.shape)}, "
                f"this detector {tuple(self._buf.shape)}"
            )
        self._buf = buf
        self._pos = int(state["pos"]) % self.config.window
