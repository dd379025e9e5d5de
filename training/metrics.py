"""Accuracy, pooled PxAP over 1,000 thresholds, and Dice / mIoU at a threshold chosen elsewhere.

Thresholds are τ_i = i / 1000 (i = 0..999); histogram edges are those plus [1, 2, 3] (1,002 bins), as in
wsolevaluation. TP(τ_i) counts positive pixels with score ≥ τ_i, so `thresholds[i]` is the value actually
used at index i (no mirrored τ).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

N_THRESHOLDS = 1000
THRESHOLDS = np.arange(N_THRESHOLDS, dtype=np.float64) / N_THRESHOLDS
EDGES = np.concatenate([THRESHOLDS, [1.0, 2.0, 3.0]])


class MetricError(ValueError):
    """A score map or mask cannot be scored."""


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in %."""
    if len(labels) == 0:
        return float("nan")
    return float(100.0 * np.mean(np.asarray(pred) == np.asarray(labels)))


@dataclass
class PixelCounts:
    """Pooled score histograms of positive and negative pixels over a split."""

    pos_hist: np.ndarray
    neg_hist: np.ndarray

    @classmethod
    def empty(cls) -> PixelCounts:
        """No pixels yet."""
        n = len(EDGES) - 1
        return cls(np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64))

    def add(self, scores: np.ndarray, mask: np.ndarray) -> None:
        """Accumulate one image: scores in [0, 1] and a boolean mask of the same shape."""
        if scores.shape != mask.shape:
            raise MetricError(f"score map {scores.shape} and mask {mask.shape} differ; resize the map first")
        scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0)
        if scores.size and (scores.min() < 0 or scores.max() > 1):
            raise MetricError(f"scores must lie in [0, 1], got [{scores.min():.4g}, {scores.max():.4g}]")
        mask = np.asarray(mask, dtype=bool)
        self.pos_hist += np.histogram(scores[mask], bins=EDGES)[0]
        self.neg_hist += np.histogram(scores[~mask], bins=EDGES)[0]

    def curves(self) -> tuple[np.ndarray, np.ndarray]:
        """TP and FP at each edge (ascending thresholds): counts of pixels with score ≥ edge."""
        tp = np.cumsum(self.pos_hist[::-1])[::-1]
        fp = np.cumsum(self.neg_hist[::-1])[::-1]
        return tp, fp

    def pxap(self) -> float:
        """Pixel average precision in %: Σ precision_i · (recall_i − recall_{i−1}), thresholds descending."""
        n_pos = int(self.pos_hist.sum())
        if n_pos == 0:
            return float("nan")
        tp, fp = self.curves()
        tp_d, fp_d = tp[::-1].astype(np.float64), fp[::-1].astype(np.float64)
        predicted = tp_d + fp_d
        precision = np.divide(tp_d, predicted, out=np.zeros_like(tp_d), where=predicted > 0)
        recall = tp_d / n_pos
        gain = np.diff(np.concatenate([[0.0], recall]))
        return float(100.0 * np.sum(precision * gain))

    def scores_at(self, index: int) -> dict[str, float]:
        """Dice fg/bg, IoU fg/bg and mIoU (in %) when pixels with score ≥ THRESHOLDS[index] are foreground."""
        tp_all, fp_all = self.curves()
        n_pos, n_neg = float(self.pos_hist.sum()), float(self.neg_hist.sum())
        tp, fp = float(tp_all[index]), float(fp_all[index])
        fn, tn = n_pos - tp, n_neg - fp
        dice_fg = _ratio(2 * tp, 2 * tp + fp + fn)
        dice_bg = _ratio(2 * tn, 2 * tn + fp + fn)
        iou_fg = _ratio(tp, tp + fp + fn)
        iou_bg = _ratio(tn, tn + fp + fn)
        return {
            "tau": float(THRESHOLDS[index]),
            "dice_fg": 100 * dice_fg,
            "dice_bg": 100 * dice_bg,
            "iou_fg": 100 * iou_fg,
            "iou_bg": 100 * iou_bg,
            "miou": 100 * (iou_fg + iou_bg) / 2,
        }

    def best_index(self) -> int:
        """Threshold index that maximises mIoU (the first one on ties)."""
        tp, fp = (c[:N_THRESHOLDS].astype(np.float64) for c in self.curves())
        n_pos, n_neg = float(self.pos_hist.sum()), float(self.neg_hist.sum())
        fn, tn = n_pos - tp, n_neg - fp
        with np.errstate(divide="ignore", invalid="ignore"):
            miou = np.nan_to_num(tp / (tp + fp + fn)) + np.nan_to_num(tn / (tn + fp + fn))
        return int(np.argmax(miou))


def tau_index(tau: float) -> int:
    """Index of the threshold τ on the 1,000-step grid."""
    if not 0 <= tau < 1:
        raise MetricError(f"threshold {tau} is outside [0, 1)")
    return int(round(tau * N_THRESHOLDS))


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0
