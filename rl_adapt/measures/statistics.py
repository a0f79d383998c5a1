"""Statistics of per-image and per-patient scores: NaN-aware means, bootstrap intervals, paired comparisons.

Conventions:

* NaN means *undefined* (e.g. HD with an empty mask): summaries drop NaNs and report how many;
* bootstrap confidence intervals are percentile intervals of the mean over ``n_bootstrap`` resamples
  drawn from ``numpy.random.default_rng(seed)`` — the same inputs always give the same interval.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.stats import wilcoxon


def as_float(x: Any) -> float:
    """``x`` as a float; None and non-numbers become NaN."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _as_float_array(values: Iterable[Any]) -> np.ndarray:
    return np.asarray([as_float(v) for v in values], dtype=float)


def nanmean(values: Iterable[Any]) -> tuple[float, int]:
    """Mean of the finite values and how many there were; ``(nan, 0)`` when none."""
    arr = _as_float_array(values)
    ok = np.isfinite(arr)
    n = int(ok.sum())
    return (float(arr[ok].mean()) if n else float("nan")), n


def bootstrap_ci(values: Sequence[float], n_bootstrap: int = 2000, seed: int = 0,
                 level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval ``[lo, hi]`` of the mean of the finite values (NaN if none)."""
    x = _as_float_array(values)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return [math.nan, math.nan]
    if x.size == 1:
        return [float(x[0]), float(x[0])]
    rng = np.random.default_rng(seed)
    means = np.empty(n_bootstrap)
    chunk = max(1, 4_000_000 // x.size)
    for s in range(0, n_bootstrap, chunk):
        k = min(chunk, n_bootstrap - s)
        means[s : s + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return [float(lo), float(hi)]


def summarize(values: Iterable[Any], n_bootstrap: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean, std (ddof=1), median and 95 % bootstrap CI of the finite values; NaNs are counted, not used.

    :param values: numbers (None / NaN / non-numeric count as NaN).
    :return: ``{"mean", "std", "median", "ci95": [lo, hi], "n", "n_nan"}`` (``n`` = finite values used).
    """
    x = _as_float_array(values)
    finite = x[np.isfinite(x)]
    n = int(finite.size)
    return {
        "mean": float(finite.mean()) if n else math.nan,
        "std": float(finite.std(ddof=1)) if n > 1 else (0.0 if n == 1 else math.nan),
        "median": float(np.median(finite)) if n else math.nan,
        "ci95": bootstrap_ci(finite, n_bootstrap, seed),
        "n": n,
        "n_nan": int(x.size - n),
    }


def paired_difference(a: Iterable[Any], b: Iterable[Any], n_bootstrap: int = 2000,
                      seed: int = 0) -> dict[str, Any]:
    """Paired comparison of two methods on the same items: ``d = a − b``.

    Pairs where either value is NaN are dropped (counted in ``n_dropped``).

    :return: ``{"mean_diff", "ci95": [lo, hi] (bootstrap of the mean difference), "wilcoxon_p"
        (two-sided signed-rank, scipy.stats.wilcoxon; 1.0 when all differences are 0, NaN with no pair),
        "n", "n_dropped"}``.
    """
    x, y = _as_float_array(a), _as_float_array(b)
    if x.shape != y.shape:
        raise ValueError(f"paired_difference needs equal lengths, got {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    if d.size == 0:
        p = math.nan
    elif np.all(d == 0):
        p = 1.0
    else:
        p = float(wilcoxon(d).pvalue)
    return {
        "mean_diff": float(d.mean()) if d.size else math.nan,
        "ci95": bootstrap_ci(d, n_bootstrap, seed),
        "wilcoxon_p": p,
        "n": int(d.size),
        "n_dropped": int(x.size - d.size),
    }
