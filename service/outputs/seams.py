"""How much a heatmap shows the grid it was computed on: the seam score (1.0 = no seam).

For each axis, the absolute step between neighbouring analysed cells is averaged per boundary (per column
boundary for x, over the rows where both cells are analysed; per row boundary for y); those means are folded
modulo the tiling period (the model window or the tile/region stride, in heatmap cells) and averaged per phase;
the score of the axis is the largest phase mean over the median one. A map computed tile by tile steps at one
phase (the tile border) and scores well above 1; a map without seams has no preferred phase and scores near 1
(natural maps score about 1.2–1.35 through chance alignment of structure). Planes: `hm_` heatmap cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SeamScore", "seam_score"]


@dataclass(frozen=True)
class SeamScore:
    """Seam scores of one heatmap at one period: per axis and the larger of the two."""

    x: float
    y: float
    period: int

    @property
    def score(self) -> float:
        """The larger of the two axes' scores."""
        return max(self.x, self.y)

    def to_dict(self) -> dict[str, float]:
        return {"score": round(self.score, 4), "x": round(self.x, 4), "y": round(self.y, 4), "period": self.period}


def _axis_score(hm: np.ndarray, period: int) -> float:
    """The folded step score along axis 1 (between columns) of `hm` (NaN = not analysed)."""
    steps = np.abs(np.diff(hm, axis=1))  # (H, W-1): NaN where either cell is not analysed
    valid = np.isfinite(steps)
    counts = valid.sum(axis=0)
    sums = np.where(valid, steps, 0.0).sum(axis=0)
    boundary_means = np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)
    phase = np.arange(boundary_means.size) % period
    phase_means = np.array([np.nanmean(boundary_means[phase == p]) if np.isfinite(boundary_means[phase == p]).any()
                            else np.nan for p in range(period)])
    phase_means = phase_means[np.isfinite(phase_means)]
    if phase_means.size < 2:
        return float("nan")
    median = float(np.median(phase_means))
    if median <= 0:
        return float("inf") if phase_means.max() > 0 else 1.0
    return float(phase_means.max() / median)


def seam_score(hm: np.ndarray, period: int) -> SeamScore:
    """The seam score of a heatmap (H, W) of probabilities, NaN where not analysed, at `period` cells.

    NaN when an axis has fewer than two phases with analysed neighbours (a map smaller than two cells of the
    period, or with nothing analysed).
    """
    hm = np.asarray(hm, np.float64)
    if hm.ndim != 2:
        raise ValueError(f"the heatmap must be 2-D (H, W), got shape {hm.shape}")
    if period < 2:
        raise ValueError(f"the period must be at least 2 cells, got {period}")
    return SeamScore(x=_axis_score(hm, period), y=_axis_score(hm.T, period), period=int(period))
