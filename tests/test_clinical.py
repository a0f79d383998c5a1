"""Clinical indices on analytic shapes: Simpson volumes of truncated ellipsoids, EF, GLS, areas, API forms."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rl_adapt.measures.clinical import (
    area_length_volume,
    lv_geometry,
    patient_indices,
    resample_isotropic,
    strain_curve,
)
from rl_adapt.data.case import Case


def phantom(a, c, z0, spacing, t=8.0, fov=(100.0, 90.0)):
    """Apex-up section (mm) of an ellipsoid with short semi-axis a, long semi-axis c, cut by the mitral
    plane z0 mm below its centre; MYO shell of thickness t around it and an LA below the plane."""
    sr, sc = spacing
    h, w = int(fov[0] / sr), int(fov[1] / sc)
    y, x = np.mgrid[0:h, 0:w].astype(float)
    y, x = (y + 0.5) * sr, (x + 0.5) * sc
    cy, cx = c + t + 4, fov[1] / 2
    base = cy + z0
    m = np.zeros((h, w), np.uint8)
    above = y <= base
    m[(((y - cy) / (c + t)) ** 2 + ((x - cx) / (a + t)) ** 2 <= 1) & above] = 2
    m[(((y - cy) / c) ** 2 + ((x - cx) / a) ** 2 <= 1) & above] = 1
    la_rx = 0.9 * a * math.sqrt(1 - (z0 / c) ** 2)
    m[((((y - base) / 20) ** 2 + ((x - cx) / la_rx) ** 2) <= 1) & (y > base)] = 3
    return m


def truncated_ellipsoid_ml(a, b, c, z0):
    """Volume (ml) of {x²/a² + y²/b² + z²/c² <= 1, z <= z0} (z towards the base), a, b, c, z0 in mm."""
    return math.pi * a * b * ((z0 + c) - (z0 ** 3 + c ** 3) / (3 * c ** 2)) / 1000.0


SHAPES = [(25.0, 25.0, 55.0, 15.0), (18.0, 18.0, 42.0, 10.0), (22.0, 17.0, 50.0, 12.0)]
SPACINGS = [(0.3, 0.3), (0.3, 0.6), (0.5, 0.25)]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_simpson_biplane_volume_within_3_percent(spacing):
    for a, b, c, z0 in SHAPES:
        m2, m4 = phantom(a, c, z0, spacing), phantom(b, c, z0, spacing)
        res = patient_indices({("2CH", "ED"): (m2, spacing), ("4CH", "ED"): (m4, spacing)})
        true = truncated_ellipsoid_ml(a, b, c, z0)
        assert res["volume_method"] == "biplane"
        assert abs(res["EDV"] / true - 1) < 0.03, (a, b, c, z0, spacing, res["EDV"], true)
        assert res["LV_length_2CH_ED"] == pytest.approx(c + z0, rel=0.05)


def test_ejection_fraction_of_a_known_contraction_within_one_point():
    spacing = (0.3, 0.45)
    ed, es = (24.0, 54.0, 14.0), (17.0, 47.0, 12.0)
    masks = {}
    for phase, (a, c, z0) in (("ED", ed), ("ES", es)):
        masks[("2CH", phase)] = (phantom(a, c, z0, spacing), spacing)
        masks[("4CH", phase)] = (phantom(a * 1.1, c, z0, spacing), spacing)
    res = patient_indices(masks)
    v_ed = truncated_ellipsoid_ml(ed[0], ed[0] * 1.1, ed[1], ed[2])
    v_es = truncated_ellipsoid_ml(es[0], es[0] * 1.1, es[1], es[2])
    true_ef = 100 * (v_ed - v_es) / v_ed
    assert abs(res["EF"] - true_ef) < 1.0, (res["EF"], true_ef)
    assert res["ESV"] < res["EDV"]
    # GLS: endocardial arc through the apex shortens
    assert -40 < res["GLS_2CH"] < -5 and -40 < res["GLS_4CH"] < -5
    assert res["GLS"] == pytest.approx((res["GLS_2CH"] + res["GLS_4CH"]) / 2)
    assert res["LV_mass"] > 0 and res["MYO_area_2CH_ED"] > 0


def _half_ellipse_arc_mm(a, c, z0):
    """Length of the ellipse arc from one base point through the apex to the other (mm)."""
    z = np.linspace(-c, z0, 20001)
    x = a * np.sqrt(np.clip(1 - (z / c) ** 2, 0, None))
    return 2 * np.sum(np.hypot(np.diff(z), np.diff(x)))


def test_gls_matches_analytic_arc_length_and_sequence_strain():
    spacing = (0.25, 0.25)
    ed, es = (22.0, 50.0, 12.0), (17.0, 42.0, 10.0)
    # bare masks mean spacing (1, 1): lengths are then in pixels, but strain is a ratio
    res = patient_indices({("4CH", "ED"): phantom(*ed, spacing), ("4CH", "ES"): phantom(*es, spacing)})
    true = 100 * (_half_ellipse_arc_mm(*es) / _half_ellipse_arc_mm(*ed) - 1)
    assert abs(res["GLS_4CH"] - true) < 1.5, (res["GLS_4CH"], true)
    assert math.isnan(res["GLS_2CH"]) and res["volume_method"] == "4CH"
    seq = [phantom(22.0 - k, 50.0 - 2 * k, 12.0, spacing) for k in range(4)]
    curve = strain_curve(seq, spacing)
    assert curve[0] == 0 and np.all(np.diff(curve) < 0)


def test_cases_input_areas_and_undefined_values():
    spacing = (0.3, 0.3)
    m = phantom(20.0, 45.0, 10.0, spacing)
    cases = [Case(f"p_{v}_{p}", np.zeros_like(m, np.float32), m, spacing, {"view": v, "phase": p, "patient": "p"})
             for v in ("2CH", "4CH") for p in ("ED", "ES")]
    res = patient_indices(cases)
    assert res["EF"] == pytest.approx(0.0, abs=1e-9)
    assert res["LV_area_2CH_ED"] == pytest.approx(np.count_nonzero(m == 1) * 0.09 / 100)
    half_ellipse_cm2 = math.pi * 20 * 45 / 2 / 100  # the section reaches 10 mm below the centre
    assert half_ellipse_cm2 < res["LV_area_2CH_ED"] < 2 * half_ellipse_cm2
    # area-length volume of a circle-section sphere is exact: A = pi r^2, L = 2r -> 4/3 pi r^3
    r = 20.0
    assert area_length_volume(math.pi * r ** 2, 2 * r) == pytest.approx(4 / 3 * math.pi * r ** 3 / 1000)
    empty = np.zeros((50, 50), np.uint8)
    assert lv_geometry(empty) is None
    res = patient_indices({("2CH", "ED"): empty})
    assert math.isnan(res["EDV"]) and math.isnan(res["EF"]) and math.isnan(res["GLS"])


def test_resample_isotropic_keeps_physical_size():
    m = np.zeros((10, 20), np.uint8); m[2:6, 5:15] = 1
    iso, s = resample_isotropic(m, (0.5, 0.25))
    assert s == 0.25 and iso.shape == (20, 20)
    assert np.count_nonzero(iso) * s * s == pytest.approx(np.count_nonzero(m) * 0.5 * 0.25)
