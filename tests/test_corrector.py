"""Corrector: each clean-up step on a mask with that defect, clean masks untouched, and every correction path."""
from __future__ import annotations

import numpy as np
import pytest

from rl_adapt.measures.anatomy import check_anatomy
from rl_adapt.cleanup import CleanupConfig, clean_mask, separate_myo_la
from rl_adapt.engine.corrector import Corrector, CorrectorConfig
from rl_adapt.measures.metrics import mean_dice
from rl_adapt.errors import InputError

from phantoms import BG, LA, LV, MYO  # noqa: E402,F401
from phantoms import heart as phantom_heart  # noqa: E402


def heart(size: int = 64, seed: int = 0) -> np.ndarray:
    """The shared phantom, seeded."""
    return phantom_heart(size, np.random.default_rng(seed))


def valid_hearts(size: int, n: int) -> list[np.ndarray]:
    out, seed = [], 0
    while len(out) < n:
        m = heart(size, seed)
        seed += 1
        if check_anatomy(m).valid:
            out.append(m)
    return out


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return valid_hearts(96, 1)[0]


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _centroid(mask, lab):
    return np.argwhere(mask == lab).mean(0).round().astype(int)


@pytest.mark.parametrize("size", [64, 96, 128])
def test_clean_masks_are_returned_unchanged(size):
    for m in valid_hearts(size, 4):
        out = clean_mask(m)
        assert out.dtype == np.uint8 and out.shape == m.shape
        np.testing.assert_array_equal(out, m)


def test_stray_components_are_removed_and_reassigned(clean):
    m = clean.copy()
    m[_disk(m.shape, 8, 8, 3)] = LV                # LV island in the background
    m[_disk(m.shape, 85, 85, 2)] = LA              # second LA component
    cy, cx = _centroid(clean, LV)
    m[_disk(m.shape, cy, cx, 3)] = MYO             # MYO island inside the cavity
    assert not check_anatomy(m).valid
    out = clean_mask(m)
    np.testing.assert_array_equal(out, clean)


def test_holes_are_filled(clean):
    m = clean.copy()
    cy, cx = _centroid(clean, LV)
    m[_disk(m.shape, cy, cx, 4)] = BG              # hole in the LV
    ly, lx = _centroid(clean, LA)
    m[_disk(m.shape, ly, lx, 2)] = BG              # hole in the LA
    wall = np.argwhere(clean == MYO)
    top = wall[wall[:, 0].argmin()] + np.array([1, 0])  # a pixel inside the apical wall
    m[top[0], top[1]] = BG                         # a one-pixel hole in the myocardium
    assert check_anatomy(m).failed
    out = clean_mask(m)
    assert check_anatomy(out).valid
    assert mean_dice(out, clean) > 0.99
    assert (out[_disk(m.shape, cy, cx, 4)] == LV).all()
    assert (out[_disk(m.shape, ly, lx, 2)] == LA).all()


def test_lv_myo_and_lv_la_gaps_are_closed(clean):
    m = clean.copy()
    lv = clean == LV
    rows = np.flatnonzero(lv.any(1))
    # a one-pixel background line between the LV and the MYO along the left wall (mid-ventricle)
    for r in rows[len(rows) // 3 : 2 * len(rows) // 3]:
        c = np.flatnonzero(lv[r])[0]
        m[r, c] = BG
    # a background row between LV and LA on the mitral plane
    base = rows[-1]
    m[base][clean[base] == LV] = BG
    assert not check_anatomy(m).valid
    out = clean_mask(m)
    assert check_anatomy(out).valid, check_anatomy(out).failed
    assert mean_dice(out, clean) > 0.98
    assert not ((out == BG) & (clean != BG)).any()


def test_myocardium_wraps_an_exposed_cavity(clean):
    m = clean.copy()
    rows = np.flatnonzero((clean == LV).any(1))
    mid = slice(rows[0] + len(rows) // 3, rows[0] + 2 * len(rows) // 3)
    right = np.zeros_like(clean, dtype=bool)
    right[mid, clean.shape[1] // 2 :] = True
    m[right & (clean == MYO)] = BG                 # lateral wall missing: LV touches background
    assert "frontier_lv_bg" in check_anatomy(m).failed
    out = clean_mask(m, CleanupConfig(rim_px=3))
    exposed = (out == LV) & np.roll(out == BG, 1, axis=1)
    assert not exposed.any()
    assert check_anatomy(out).valid, check_anatomy(out).failed
    # the rim grows outwards: the cavity keeps its size
    assert abs(int((out == LV).sum()) - int((clean == LV).sum())) <= 0.01 * (clean == LV).sum()


def test_mitral_seam_and_tiny_structures(clean):
    m = clean.copy()
    base = np.flatnonzero((clean == LV).any(1))[-1]
    m[base][clean[base] == LV] = MYO               # a one-pixel MYO seam between LV and LA
    assert "frontier_myo_la" in check_anatomy(m).failed
    out = clean_mask(m)
    assert check_anatomy(out).valid, check_anatomy(out).failed
    assert mean_dice(out, clean) > 0.99
    tiny = np.zeros_like(clean)
    tiny[40:44, 40:43] = LA                        # a 12-pixel structure, nothing else
    assert not clean_mask(tiny, CleanupConfig(min_structure_px=13)).any()


def test_la_touching_the_myocardium_is_detached(clean):
    m = clean.copy()
    top = np.flatnonzero((clean == LA).any(1))[0]
    cols = np.flatnonzero(clean[top - 1] > BG)     # the base row: LV flanked by the two MYO ends
    m[top, cols[0] : cols[-1] + 1] = LA            # the LA's top row as wide as the epicardium: it touches the MYO
    assert check_anatomy(m).failed == ["frontier_myo_la"]
    detach = CleanupConfig(myo_la_frontier_max=0.11)
    out = clean_mask(m, detach)
    assert check_anatomy(out).valid, check_anatomy(out).failed
    changed = out != m
    assert changed.any() and set(np.flatnonzero(changed.any(1))) <= {top - 1, top}  # only at the mitral plane
    assert ((m[changed] == LA) & (out[changed] == BG)).mean() > 0.8   # mostly LA pixels given to the background
    assert mean_dice(out, clean) > 0.99
    # at or below the threshold nothing changes; None switches the step off
    np.testing.assert_array_equal(separate_myo_la(clean), clean)
    np.testing.assert_array_equal(separate_myo_la(m, None), m)
    assert check_anatomy(clean_mask(m)).failed == ["frontier_myo_la"]   # off by default
    np.testing.assert_array_equal(clean_mask(clean, detach), clean)


def test_cleanup_is_deterministic_and_idempotent():
    rng = np.random.default_rng(3)
    m = heart(64, 1)
    noise = rng.random(m.shape) < 0.03
    m[noise] = rng.integers(0, 4, noise.sum())
    a, b = clean_mask(m), clean_mask(m.copy())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(clean_mask(a), a)
    assert check_anatomy(a).valid, check_anatomy(a).failed


def test_bad_input():
    with pytest.raises(InputError, match="2-D"):
        clean_mask(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(InputError, match="0..3"):
        clean_mask(np.full((8, 8), 7, np.uint8))
    with pytest.raises(InputError, match="names"):
        Corrector().correct(np.zeros((2, 8, 8), np.uint8), names=["a"])


class _FixedPrior:
    """Stands in for a trained ShapePrior: projects every mask onto one plausible shape."""

    def __init__(self, shape: np.ndarray):
        self.shape = shape
        self.calls = 0

    def project(self, masks: np.ndarray) -> np.ndarray:
        self.calls += len(masks)
        return np.repeat(self.shape[None], len(masks), axis=0)


def test_corrector_paths_summary_and_acceptance(clean):
    small_defect = clean.copy()
    cy, cx = _centroid(clean, LV)
    small_defect[_disk(clean.shape, cy, cx, 2)] = BG        # hole: Dice to correction stays > 0.95
    big_defect = clean.copy()
    big_defect[_disk(clean.shape, cy, cx, 12)] = MYO       # huge MYO blob in the cavity -> cleanup
    no_la = np.where(clean == LA, BG, clean).astype(np.uint8)  # clean-up cannot invent an LA
    expert_mask = valid_hearts(96, 2)[1]
    masks = np.stack([clean, small_defect, big_defect, no_la, small_defect])
    names = ["ok", "small", "big", "no_la", "fixed_by_expert"]
    prior = _FixedPrior(clean)
    corr = Corrector(CorrectorConfig(dice_threshold=0.95), shape_prior=prior,
                     expert={"fixed_by_expert": expert_mask, "not_in_batch": clean})
    res = corr.correct(masks, names=names)
    assert res.path == ["unchanged", "cleanup", "cleanup", "shape_prior", "expert"]
    assert prior.calls == 1
    np.testing.assert_array_equal(res.corrected[0], clean)
    np.testing.assert_array_equal(res.corrected[3], clean)
    np.testing.assert_array_equal(res.corrected[4], expert_mask)
    assert res.valid_before == [True, False, False, False, False]
    assert all(res.valid_after)
    assert res.dice_to_input[0] == 1.0 and res.dice_to_input[1] > 0.95 and res.dice_to_input[2] < 0.95
    assert res.accepted == [True, True, False, False, True]
    s = res.summary()
    assert s["n"] == 5 and s["n_unchanged"] == 1 and s["n_cleanup"] == 2 and s["n_shape_prior"] == 1
    assert s["n_expert"] == 1 and s["validity_after"] == 1.0 and s["acceptance_rate"] == pytest.approx(0.6)


class _RecordingPrior(_FixedPrior):
    """Projects onto one shape and remembers what it was given."""

    def project(self, masks: np.ndarray) -> np.ndarray:
        self.seen = np.array(masks, copy=True)
        return super().project(masks)


def test_shape_prior_on_all_masks_from_the_raw_prediction(clean):
    other = valid_hearts(96, 2)[1]
    cy, cx = _centroid(clean, LV)
    holed = clean.copy()
    holed[_disk(clean.shape, cy, cx, 2)] = BG                # invalid, the clean-up fixes it
    masks = np.stack([clean, holed])
    # default: only masks still invalid after the clean-up are projected -> none here
    prior = _RecordingPrior(other)
    res = Corrector(CorrectorConfig(), shape_prior=prior).correct(masks)
    assert prior.calls == 0 and res.path == ["unchanged", "cleanup"]
    # "all": every mask is projected, and the valid projection replaces the clean-up
    prior = _RecordingPrior(other)
    res = Corrector(CorrectorConfig(shape_prior_on="all"), shape_prior=prior).correct(masks)
    assert prior.calls == 2 and res.path == ["shape_prior", "shape_prior"]
    np.testing.assert_array_equal(res.corrected[1], other)
    np.testing.assert_array_equal(prior.seen[1], clean)        # it was given the cleaned mask ...
    prior = _RecordingPrior(other)
    Corrector(CorrectorConfig(shape_prior_on="all", shape_prior_input="raw"), shape_prior=prior).correct(masks)
    np.testing.assert_array_equal(prior.seen[1], holed)        # ... or the raw prediction
    # an invalid projection leaves the clean-up in place
    res = Corrector(CorrectorConfig(shape_prior_on="all"), shape_prior=_FixedPrior(np.zeros_like(clean))).correct(masks)
    assert res.path == ["unchanged", "cleanup"] and all(res.valid_after)
    with pytest.raises(ValueError):
        CorrectorConfig(shape_prior_on="some")
    with pytest.raises(ValueError):
        CorrectorConfig(shape_prior_input="cleanest")


def test_corrector_without_prior_keeps_cleanup_and_reports_invalid(clean):
    no_la = np.where(clean == LA, BG, clean).astype(np.uint8)
    res = Corrector(CorrectorConfig(use_shape_prior=True)).correct(no_la[None])
    assert res.path == ["cleanup"] or res.path == ["unchanged"]
    assert res.valid_after == [False] and "missing_structure" in res.failed_after[0]
    assert res.accepted == [False]
    res = Corrector(CorrectorConfig(use_shape_prior=False), shape_prior=_FixedPrior(clean)).correct(no_la[None])
    assert res.path[0] != "shape_prior"


def test_expert_mask_with_wrong_shape_is_rejected(clean):
    with pytest.raises(InputError, match="shape"):
        Corrector(expert={"a": np.zeros((10, 10), np.uint8)}).correct(clean[None], names=["a"])
