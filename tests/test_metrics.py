"""Dice / HD / HD95 / ASSD: equal to medpy on random and heart-shaped masks, documented empty cases."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from rl_adapt.measures.metrics import (
    STRUCTURES,
    assd,
    binary_metrics,
    dice,
    hausdorff,
    hd95,
    segmentation_metrics,
    structure_mask,
    surface_distances,
)

medpy_binary = pytest.importorskip("medpy.metric.binary")


def _medpy(a, b, spacing):
    return {
        "dice": medpy_binary.dc(a, b),
        "hd": medpy_binary.hd(a, b, spacing),
        "hd95": medpy_binary.hd95(a, b, spacing),
        "assd": medpy_binary.assd(a, b, spacing),
    }


def _heart(rng, size=96):
    """Perturbed apex-up heart label map (LV, MYO shell, LA) with random size, position and wobble."""
    r, c = np.mgrid[0:size, 0:size].astype(float)
    cy, cx = size * rng.uniform(0.35, 0.5), size * rng.uniform(0.4, 0.6)
    ly, lx, t = size * rng.uniform(0.2, 0.3), size * rng.uniform(0.09, 0.14), size * rng.uniform(0.03, 0.06)
    theta = np.arctan2(r - cy, c - cx)
    wob = 1 + 0.08 * np.sin(rng.integers(2, 6) * theta + rng.uniform(0, 6))
    base = cy + 0.3 * ly
    rho = np.sqrt(((r - cy) / ly) ** 2 + ((c - cx) / lx) ** 2) / wob
    rho_epi = np.sqrt(((r - cy) / (ly + t)) ** 2 + ((c - cx) / (lx + t)) ** 2) / wob
    m = np.zeros((size, size), np.uint8)
    m[(rho_epi <= 1) & (r <= base)] = 2
    m[(rho <= 1) & (r <= base)] = 1
    m[((((r - base) / (0.5 * ly)) ** 2 + ((c - cx) / (0.9 * lx)) ** 2) <= 1) & (r > base)] = 3
    return m


def test_equal_to_medpy_on_random_masks():
    rng = np.random.default_rng(0)
    n = 0
    for i in range(150):
        h, w = rng.integers(4, 48, size=2)
        a = rng.random((h, w)) < rng.uniform(0.05, 0.9)
        b = rng.random((h, w)) < rng.uniform(0.05, 0.9)
        if i % 2:
            a, b = ndimage.binary_opening(a), ndimage.binary_closing(b)
        if not a.any() or not b.any():
            continue
        spacing = tuple(rng.uniform(0.2, 3.0, size=2))
        ours, ref = binary_metrics(a, b, spacing), _medpy(a, b, spacing)
        for k in ref:
            assert ours[k] == pytest.approx(ref[k], abs=1e-6), (i, k)
        n += 1
    assert n > 100


def test_equal_to_medpy_on_heart_shaped_label_maps():
    rng = np.random.default_rng(1)
    for i in range(25):
        gt, pred = _heart(rng), _heart(rng)
        if i == 0:
            pred = gt.copy()  # identical masks: zero distances
        spacing = (rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.6))
        res = segmentation_metrics(pred, gt, spacing)
        assert list(res) == list(STRUCTURES)
        for s in STRUCTURES:
            ref = _medpy(structure_mask(pred, s), structure_mask(gt, s), spacing)
            for k in ref:
                assert res[s][k] == pytest.approx(ref[k], abs=1e-6), (i, s, k)
        if i == 0:
            assert all(res[s]["dice"] == 1 and res[s]["hd"] == 0 for s in STRUCTURES)


def test_masks_touching_the_image_edge_match_medpy():
    a = np.zeros((20, 30), bool); a[:8, :12] = True
    b = np.zeros((20, 30), bool); b[3:20, 5:30] = True
    for sp in [(1.0, 1.0), (0.3, 1.7)]:
        ref = _medpy(a, b, sp)
        assert hausdorff(a, b, sp) == pytest.approx(ref["hd"], abs=1e-9)
        assert hd95(a, b, sp) == pytest.approx(ref["hd95"], abs=1e-9)
        assert assd(a, b, sp) == pytest.approx(ref["assd"], abs=1e-9)


def test_empty_cases_are_documented_values():
    e = np.zeros((10, 10), bool)
    f = e.copy(); f[2:5, 2:5] = True
    assert dice(e, e) == 1.0 and dice(e, f) == 0.0 and dice(f, f) == 1.0
    assert surface_distances(e, f) is None
    for fn in (hausdorff, hd95, assd):
        assert math.isnan(fn(e, f)) and math.isnan(fn(f, e)) and math.isnan(fn(e, e))
    gt = np.zeros((10, 10), np.uint8); gt[2:5, 2:5] = 1
    res = segmentation_metrics(gt, gt)
    assert res["LA"]["dice"] == 1.0 and math.isnan(res["LA"]["hd"])
    assert res["epi"] == {"dice": 1.0, "hd": 0.0, "hd95": 0.0, "assd": 0.0}
    with pytest.raises(ValueError):
        segmentation_metrics(gt, gt[:5])
    with pytest.raises(ValueError):
        structure_mask(gt, "RV")


def test_modules_do_not_import_torch():
    code = (
        "import rl_adapt.measures.metrics, rl_adapt.measures.anatomy, rl_adapt.measures.clinical, rl_adapt.measures.statistics, rl_adapt.measures.calibration, sys; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
