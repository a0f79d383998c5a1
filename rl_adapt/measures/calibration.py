"""Calibration and error-detection scores of per-pixel probabilities (numpy only, no torch).

The reward network outputs ``p = P(pixel label is right)``. Its calibration is measured with the
expected calibration error over equal-width bins of ``p`` (the fraction of right pixels in a bin should
equal the mean ``p`` of the bin), and its use as an uncertainty map with the AUROC of ``1 - p`` as a
detector of wrong pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _flat(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if p.shape != y.shape:
        raise ValueError(f"probs and labels differ in size: {p.size} vs {y.size}")
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1):
        raise ValueError("probs must lie in [0, 1]")
    return p, y


@dataclass
class ReliabilityBins:
    """Equal-width bins of predicted probability (a reliability diagram)."""

    edges: np.ndarray
    """(n_bins + 1,) bin edges from 0 to 1"""
    confidence: np.ndarray
    """(n_bins,) mean predicted probability in each bin (NaN for empty bins)"""
    accuracy: np.ndarray
    """(n_bins,) fraction of positive labels in each bin (NaN for empty bins)"""
    counts: np.ndarray
    """(n_bins,) number of samples in each bin"""


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> ReliabilityBins:
    """Bin ``probs`` into ``n_bins`` equal-width bins on [0, 1] (the last bin includes 1.0).

    :param probs: any shape, predicted probability of the positive event (here: "pixel is right").
    :param labels: same size, 1/True where the event happened.
    """
    p, y = _flat(probs, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(counts > 0, sum_p / np.maximum(counts, 1), np.nan)
        acc = np.where(counts > 0, sum_y / np.maximum(counts, 1), np.nan)
    return ReliabilityBins(edges=edges, confidence=conf, accuracy=acc, counts=counts)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE = sum over bins of (bin count / total) * |accuracy - confidence|, equal-width bins.

    :param probs: any shape, probabilities in [0, 1] (per pixel).
    :param labels: same size, binary outcomes.
    :returns: ECE in [0, 1]; NaN for empty input.
    """
    bins = reliability_bins(probs, labels, n_bins)
    total = bins.counts.sum()
    if total == 0:
        return float("nan")
    nz = bins.counts > 0
    gap = np.abs(bins.accuracy[nz] - bins.confidence[nz])
    return float(np.sum(bins.counts[nz] / total * gap))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann--Whitney rank statistic (ties get average ranks).

    :param scores: any shape, higher = more likely positive (e.g. ``1 - reward`` to detect wrong pixels).
    :param labels: same size, 1/True for positives (e.g. ``segmentation != corrected``).
    :returns: AUROC in [0, 1]; NaN when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # average 1-based ranks over runs of tied scores
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg_rank = first + (counts + 1) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg_rank, counts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def error_detection_report(reward: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """ECE of ``reward`` as P(right) and AUROC of ``1 - reward`` as a detector of wrong pixels.

    :param reward: any shape, per-pixel probability that the label is right.
    :param correct: same size, True where ``segmentation == corrected``.
    :returns: ``{"ece", "auroc", "error_rate", "mean_reward", "n_pixels"}``.
    """
    p, y = _flat(reward, correct)
    return {
        "ece": expected_calibration_error(p, y, n_bins),
        "auroc": auroc(1.0 - p, ~y),
        "error_rate": float(1.0 - y.mean()) if y.size else float("nan"),
        "mean_reward": float(p.mean()) if p.size else float("nan"),
        "n_pixels": int(p.size),
    }
