"""Anatomical validity checks: a realistic phantom passes, and each defect fails its own check."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rl_adapt.measures.anatomy import ALL_CHECKS, LA_CHECKS, AnatomyConfig, check_anatomy, is_valid


def heart(size=256, lx=25.0, ly=70.0, t=9.0, la_rx=None, la_ry=50.0):
    """Apex-up phantom label map: truncated-ellipse LV, MYO shell of thickness t (px), LA below the base."""
    r, c = np.mgrid[0:size, 0:size].astype(float)
    cy, cx = 0.43 * size, size / 2
    base = cy + 0.3 * ly
    m = np.zeros((size, size), np.uint8)
    above = r <= base
    epi = ((r - cy) / (ly + t)) ** 2 + ((c - cx) / (lx + t)) ** 2 <= 1
    lv = ((r - cy) / ly) ** 2 + ((c - cx) / lx) ** 2 <= 1
    m[epi & above] = 2
    m[lv & above] = 1
    la_rx = 0.9 * lx if la_rx is None else la_rx
    la = (((r - base) / la_ry) ** 2 + ((c - cx) / la_rx) ** 2 <= 1) & (r > base)
    m[la] = 3
    return m


def failed(mask, cfg=None):
    return set(check_anatomy(mask, cfg).failed)


def test_phantom_passes_both_presets():
    m = heart()
    rep = check_anatomy(m)
    assert rep.valid, rep.to_dict()
    assert [c.name for c in rep.checks] == list(ALL_CHECKS)
    assert is_valid(m, AnatomyConfig.rl4seg())
    fr = check_anatomy(m, AnatomyConfig.rl4seg()).values()["frontier_lv_bg"]
    assert 0.05 <= fr <= 1.5 and not set(LA_CHECKS) & set(check_anatomy(m, AnatomyConfig.rl4seg()).values())
    for size, lx, ly, t in [(128, 18, 35, 4), (224, 30, 60, 7), (256, 45, 80, 12)]:
        assert is_valid(heart(size, lx, ly, t)), check_anatomy(heart(size, lx, ly, t)).failed


def _lv_rows(m):
    rows = np.nonzero((m == 1).any(1))[0]
    return rows[0], rows[-1]


def test_each_defect_fails_its_own_check():
    base = heart()
    cy, cx = int(0.43 * 256), 128
    # hole in LA only
    m = base.copy(); m[155, cx] = 0
    assert failed(m) == {"holes_in_la"}
    # hole in the myocardial wall -> hole in the epicardium only
    m = base.copy(); m[cy, cx - 25 - 4] = 0
    assert failed(m) == {"holes_in_epi"}
    # hole in LV -> necessarily a hole in LV and in the epicardium (LV is part of it)
    m = base.copy(); m[cy, cx] = 0
    assert failed(m) == {"holes_in_lv", "holes_in_epi"}
    # stray pixels away from the heart
    for lab, name in [(1, "disconnected_lv"), (2, "disconnected_myo"), (3, "disconnected_la")]:
        m = base.copy(); m[10, cx + 5] = lab
        assert failed(m) == {name}, name
    # LV-LA gap: a background notch at the base centre, sealed by LV above and LA below
    lv_bottom = _lv_rows(base)[1]
    m = base.copy(); m[lv_bottom, cx - 3 : cx + 4] = 0
    assert failed(m) == {"gap_lv_la"}, check_anatomy(m).to_dict()
    # the same notch of 3 pixels is below the H*W/2**14 = 4 pixel tolerance
    m = base.copy(); m[lv_bottom, cx - 1 : cx + 2] = 0
    assert is_valid(m)
    # LA narrower than the LV base: LV opens onto background
    assert failed(heart(la_rx=8)) == {"frontier_lv_bg"}
    # LA wider than the epicardium: it touches the myocardium along its whole base
    assert failed(heart(la_rx=55)) == {"frontier_myo_la"}
    # thin myocardium: LV/MYO width ratio too large
    assert failed(heart(t=3)) == {"width_ratio_lv_myo"}
    # thick myocardium with a one-pixel neck: splits at the first erosion
    m = heart(lx=30, t=24)
    row = cy
    wall = np.nonzero(m[row - 2 : row + 3, : cx] == 2)[1]
    m[row - 2 : row + 3, wall.min() + 1 : cx] = 1
    rep = check_anatomy(m)
    assert set(rep.failed) == {"erosion_ratio_myo"}, rep.to_dict()


def test_gap_between_lv_and_myo_and_missing_structure():
    base = heart()
    cy, cx = int(0.43 * 256), 128
    m = base.copy()
    inner = np.nonzero(base[cy - 3 : cy + 3, :cx] == 1)[1].min()
    m[cy - 3 : cy + 3, inner] = 0  # 6 background pixels between LV and MYO: also a hole of the epicardium
    assert failed(m) == {"gap_lv_myo", "holes_in_epi"}
    m = base.copy(); m[m == 3] = 0
    rep = check_anatomy(m)
    assert not rep.valid and "missing_structure" in rep.failed
    assert all(math.isnan(rep.values()[n]) for n in LA_CHECKS)
    # the RL4Seg preset does not need an LA
    assert is_valid(m, AnatomyConfig.rl4seg())
    assert not is_valid(np.zeros((64, 64), np.uint8))


def test_report_dict_and_config_validation():
    m = heart(); m[10, 128] = 1
    d = check_anatomy(m).to_dict()
    assert d["valid"] is False and d["failed"] == ["disconnected_lv"]
    assert d["checks"]["disconnected_lv"] == {"value": 1.0, "threshold": [None, 0], "passed": False}
    with pytest.raises(ValueError):
        AnatomyConfig(checks=("nope",))
    with pytest.raises(ValueError):
        AnatomyConfig(checks=("holes_in_la",), la_as_background=True)
    only = AnatomyConfig(checks=("holes_in_lv",))
    assert [c.name for c in check_anatomy(m, only).checks] == ["holes_in_lv"]


def test_real_camus_masks_mostly_valid_after_resize_cleanup(camus_dir):
    """Real expert masks: the raw 224² files carry label-interpolation artefacts (see camus_validity);
    after removing stray components most masks pass the RL4Seg preset."""
    import SimpleITK as sitk
    from rl_adapt.data.label_repair import remove_resize_artefacts

    files = sorted((camus_dir / "labelsTr").glob("*.nii.gz"))[:36]
    masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in files]
    cleaned = [remove_resize_artefacts(m) for m in masks]
    valid = np.mean([is_valid(m, AnatomyConfig.rl4seg()) for m in cleaned])
    assert valid >= 0.9
    reps = [check_anatomy(m) for m in masks]
    assert all("missing_structure" not in r.failed for r in reps)
