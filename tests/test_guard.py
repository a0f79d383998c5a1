"""The PPO guard's verdict: any fall of the judge rejects by default; with ``tolerance_se`` only a fall larger than
that many standard errors of the paired per-image change does."""
import numpy as np
import pytest

from rl_adapt.engine.guard import judge
from rl_adapt.measures.metrics import mean_dice


def _masks(n: int = 12, size: int = 24, seed: int = 0) -> np.ndarray:
    """(n, size, size) uint8 label maps: LV, MYO and LA blocks of seeded sizes."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size), np.uint8)
    for m in out:
        a, b = rng.integers(6, 10, 2)
        m[2:2 + a, 2:2 + b] = 1
        m[12:12 + a, 2:2 + b] = 2
        m[2:2 + b, 12:12 + a] = 3
    return out


def _eroded(masks: np.ndarray, images: list[int], rows: int) -> np.ndarray:
    """``masks`` with the first ``rows`` rows of every label wiped on ``images`` (a worse mask there)."""
    out = masks.copy()
    for i in images:
        for lab in (1, 2, 3):
            r = np.flatnonzero((out[i] == lab).any(axis=1))[:rows]
            out[i][r] = np.where(out[i][r] == lab, 0, out[i][r])
    return out


def test_any_fall_rejects_without_tolerance_and_the_standard_error_is_the_paired_one():
    truth = _masks()
    before = truth.copy()
    after = _eroded(truth, [0, 1], 1)  # worse on two images, unchanged on ten: a small, noisy fall
    judged = np.arange(len(truth))
    v = judge(before, after, truth, judged, enabled=True)
    diffs = np.array([mean_dice(a, t) - mean_dice(b, t) for a, b, t in zip(after, before, truth)])
    assert v.agreement_after < v.agreement_before and v.rejected
    assert v.change_se == pytest.approx(diffs.std(ddof=1) / np.sqrt(len(diffs)))
    assert v.change_se > 0
    assert not judge(before, after, truth, judged, enabled=False).rejected  # guard off: figures only


def test_a_fall_within_the_tolerance_is_kept_and_a_larger_one_rejected():
    truth = _masks()
    judged = np.arange(len(truth))
    noisy = _eroded(truth, [0], 1)  # one image of twelve slightly worse: the fall is ~1 standard error
    v = judge(truth, noisy, truth, judged, enabled=True, tolerance_se=2.0)
    fall = (v.agreement_before - v.agreement_after) / v.change_se
    assert 0 < fall < 2 and not v.rejected
    assert judge(truth, noisy, truth, judged, enabled=True, tolerance_se=0.0).rejected
    broad = _eroded(truth, list(range(12)), 2)  # every image worse: many standard errors
    w = judge(truth, broad, truth, judged, enabled=True, tolerance_se=2.0)
    assert (w.agreement_before - w.agreement_after) > 2 * w.change_se and w.rejected
    rising = judge(noisy, truth, truth, judged, enabled=True, tolerance_se=0.0)
    assert rising.agreement_after > rising.agreement_before and not rising.rejected
