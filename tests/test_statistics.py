"""Statistics: NaN-aware summaries with a seeded bootstrap, paired tests."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rl_adapt.measures.statistics import bootstrap_ci, nanmean, paired_difference, summarize


def test_summarize_counts_nans_and_is_seeded():
    vals = [1.0, 2.0, float("nan"), 3.0, None, 4.0]
    s = summarize(vals, seed=3)
    assert s["n"] == 4 and s["n_nan"] == 2
    assert s["mean"] == 2.5 and s["median"] == 2.5 and s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s["ci95"][0] < 2.5 < s["ci95"][1]
    assert summarize(vals, seed=3)["ci95"] == s["ci95"]
    empty = summarize([float("nan")])
    assert empty["n"] == 0 and empty["n_nan"] == 1 and math.isnan(empty["mean"])
    # the bootstrap CI of a large normal sample is close to mean +- 1.96 sd/sqrt(n)
    x = np.random.default_rng(0).normal(10, 2, 2000)
    lo, hi = summarize(x)["ci95"]
    half = 1.96 * 2 / math.sqrt(2000)
    assert lo == pytest.approx(x.mean() - half, abs=0.03) and hi == pytest.approx(x.mean() + half, abs=0.03)


def test_paired_difference():
    rng = np.random.default_rng(1)
    a = rng.normal(0.9, 0.02, 40)
    b = a - 0.01 + rng.normal(0, 0.002, 40)
    a[3] = np.nan
    r = paired_difference(a, b)
    assert r["n"] == 39 and r["n_dropped"] == 1
    assert r["mean_diff"] == pytest.approx(0.01, abs=0.002) and r["ci95"][0] > 0 and r["wilcoxon_p"] < 1e-6
    assert paired_difference([1, 2], [1, 2])["wilcoxon_p"] == 1.0
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])


def test_nanmean_and_bootstrap_ci_skip_undefined_values():
    assert nanmean([1.0, None, float("nan"), "x", 3.0]) == (2.0, 2)
    m, n = nanmean([])
    assert math.isnan(m) and n == 0
    assert bootstrap_ci([2.0]) == [2.0, 2.0]
    assert all(math.isnan(v) for v in bootstrap_ci([float("nan")]))
    lo, hi = bootstrap_ci(list(range(10)), seed=1)
    assert lo < 4.5 < hi and bootstrap_ci(list(range(10)), seed=1) == [lo, hi]
