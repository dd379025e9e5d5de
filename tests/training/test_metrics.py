"""PxAP on a hand-made case and against an exact AP computed by sorting; τ is not mirrored."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import THRESHOLDS, MetricError, PixelCounts, accuracy, tau_index


def exact_ap(scores: np.ndarray, mask: np.ndarray) -> float:
    """AP by sorting: precision at each distinct score times the recall it adds (independent of histograms)."""
    order = np.argsort(-scores, kind="stable")
    s, m = scores[order], mask[order]
    n_pos, ap, tp, seen, prev_recall = m.sum(), 0.0, 0, 0, 0.0
    i = 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        tp += int(m[i:j].sum())
        seen = j
        recall = tp / n_pos
        ap += (tp / seen) * (recall - prev_recall)
        prev_recall = recall
        i = j
    return 100.0 * ap


def test_hand_made_case() -> None:
    counts = PixelCounts.empty()
    counts.add(np.array([[0.9, 0.8], [0.3, 0.1]]), np.array([[True, False], [True, False]]))
    # descending: 0.9 pos (P 1, R .5), 0.8 neg (P .5), 0.3 pos (P 2/3, R 1): AP = .5 + 2/3 * .5
    assert counts.pxap() == pytest.approx(100 * (0.5 + 1 / 3))


def test_perfect_and_pooled_over_images() -> None:
    counts = PixelCounts.empty()
    counts.add(np.array([0.9, 0.2]), np.array([True, False]))
    counts.add(np.array([0.7, 0.6]), np.array([True, False]))
    assert counts.pxap() == pytest.approx(100.0)
    # pooled: one image alone is perfect, but 0.6 (neg, image 2) outranks nothing positive... add a worse image
    counts.add(np.array([0.95, 0.1]), np.array([False, True]))
    assert counts.pxap() < 100.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_exact_ap_on_quantised_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((3, 50, 60)) < 0.3
    scores = np.clip(rng.normal(0.4 + 0.3 * mask, 0.2), 0, 1)
    scores = np.floor(scores * 1000) / 1000  # one score per histogram bin: both computations must agree
    counts = PixelCounts.empty()
    for s, m in zip(scores, mask, strict=True):
        counts.add(s, m)
    assert counts.pxap() == pytest.approx(exact_ap(scores.ravel(), mask.ravel()), abs=1e-9)


def test_best_tau_is_the_threshold_actually_used() -> None:
    counts = PixelCounts.empty()
    counts.add(np.array([0.75, 0.8, 0.65, 0.1]), np.array([True, True, False, False]))
    idx = counts.best_index()
    assert 0.65 < THRESHOLDS[idx] <= 0.75  # a mirrored τ would land near 0.3
    s = counts.scores_at(idx)
    assert s["dice_fg"] == pytest.approx(100.0) and s["miou"] == pytest.approx(100.0)
    assert tau_index(float(THRESHOLDS[idx])) == idx


def test_dice_and_iou_at_a_threshold() -> None:
    counts = PixelCounts.empty()
    counts.add(np.array([0.9, 0.6, 0.4, 0.2]), np.array([True, False, True, False]))
    s = counts.scores_at(tau_index(0.5))  # predicted fg: 0.9 (TP), 0.6 (FP); 0.4 is a FN
    assert s["dice_fg"] == pytest.approx(100 * 2 / 4)
    assert s["iou_fg"] == pytest.approx(100 / 3)
    assert s["iou_bg"] == pytest.approx(100 / 3)


def test_refuses_scores_outside_unit_interval_and_shape_mismatch() -> None:
    counts = PixelCounts.empty()
    with pytest.raises(MetricError, match=r"\[0, 1\]"):
        counts.add(np.array([1.5]), np.array([True]))
    with pytest.raises(MetricError, match="differ"):
        counts.add(np.zeros((2, 2)), np.zeros((3, 3), bool))


def test_accuracy() -> None:
    assert accuracy(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])) == pytest.approx(75.0)
