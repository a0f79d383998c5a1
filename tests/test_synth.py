"""Synthetic echo generator: determinism, label validity, ground-truth EF, and measurable vendor shifts."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage as ndi

from rl_adapt.errors import InputError
from rl_adapt.synth.domains import VENDORS, apply_vendor_shift, generate_domain, patient_anatomy, shifted_spacing
from rl_adapt.synth.shapes import clinical_truth, lv_volume_ml, view_geometry
from rl_adapt.synth.vendors import fan_grid

SIZE = 64


@pytest.fixture(scope="module")
def domains() -> dict[str, list]:
    return {d: generate_domain(d, 3, seed=11, size=SIZE) for d in VENDORS}


def test_same_seed_same_arrays_other_seed_differs():
    a = generate_domain("target-shadow", 1, seed=5, size=SIZE)
    b = generate_domain("target-shadow", 1, seed=5, size=SIZE)
    c = generate_domain("target-shadow", 1, seed=6, size=SIZE)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.label, y.label)
        assert x.meta == y.meta and x.spacing == y.spacing
    assert not np.array_equal(a[0].image, c[0].image)
    assert not np.array_equal(a[0].label, c[0].label)


def test_cases_layout_and_meta(domains):
    cases = domains["source"]
    assert [c.name for c in cases[:4]] == ["patient0001_2CH_ED", "patient0001_2CH_ES",
                                            "patient0001_4CH_ED", "patient0001_4CH_ES"]
    assert len(cases) == 12
    for c in cases:
        assert c.image.dtype == np.uint8 and c.image.shape == (SIZE, SIZE)
        assert c.label.dtype == np.uint8 and c.label.shape == (SIZE, SIZE)
        assert 15 <= c.meta["EF"] <= 80 and c.meta["EDV"] > c.meta["ESV"] > 0
        assert c.meta["EF"] == pytest.approx(100 * (c.meta["EDV"] - c.meta["ESV"]) / c.meta["EDV"], abs=0.02)
        assert c.spacing[0] == pytest.approx(VENDORS["source"].depth_mm / SIZE)
    # Anatomy is paired across domains (same seed), rendering is not.
    for c, t in zip(cases, domains["target-blur"]):
        np.testing.assert_array_equal(c.label, t.label)
        assert c.meta["EF"] == t.meta["EF"]
    assert generate_domain("source", 1, seed=11, size=SIZE, first_patient=2)[0].meta["EF"] == cases[4].meta["EF"]


@pytest.mark.parametrize("domain", list(VENDORS))
def test_labels_are_valid_anatomy(domains, domain):
    for c in domains[domain]:
        grid = fan_grid(VENDORS[domain], c.image.shape)
        assert c.label[~grid.inside].max() == 0 and c.image[~grid.inside].max() == 0
        for k in (1, 2, 3):
            m = c.label == k
            assert m.sum() > 20, (c.name, k)
            assert ndi.label(m)[1] == 1, f"{c.name}: structure {k} not connected"
        assert ndi.label(c.label == 0)[1] == 1  # no holes anywhere (background is one piece)
        lv_rows = np.nonzero(c.label == 1)[0]
        la_rows = np.nonzero(c.label == 3)[0]
        assert lv_rows.mean() < la_rows.mean()  # apex up: LV above LA
        # The myocardium touches the LV; the LA touches the LV (mitral plane).
        grown = ndi.binary_dilation(c.label == 1)
        assert (grown & (c.label == 2)).any() and (grown & (c.label == 3)).any()


def test_contraction_ed_to_es(domains):
    for ed, es in zip(domains["source"][0::2], domains["source"][1::2]):
        assert ed.phase == "ED" and es.phase == "ES"
        assert (es.label == 1).sum() < (ed.label == 1).sum()  # LV smaller
        assert (es.label == 3).sum() > (ed.label == 3).sum()  # LA larger


def test_volume_formula_matches_closed_form_without_wobble():
    anat = patient_anatomy(0, 1)
    flat = dataclasses.replace(anat, wobble=tuple(tuple(tuple((0.0, 0.0) for _ in range(2)) for _ in range(2))
                                                  for _ in range(2)))
    g2, g4 = view_geometry(flat, "2CH", "ED"), view_geometry(flat, "4CH", "ED")
    closed = np.pi * g2.b * g4.b * (g2.L - ((g2.L - g2.a) ** 3 + g2.a ** 3) / (3 * g2.a ** 2)) / 1000
    assert lv_volume_ml(flat, "ED") == pytest.approx(closed, rel=1e-4)
    truth = clinical_truth(flat)
    assert truth["EF"] == pytest.approx(flat.ef, abs=0.05)  # ES is built to give the sampled EF


def test_biplane_volume_from_label_maps_agrees_with_truth():
    """Simpson's biplane on the rendered masks (fine grid) recovers the ground-truth EDV within 10 %."""
    cases = {c.name: c for c in generate_domain("source", 1, seed=2, size=192)}
    vols = {}
    for phase in ("ED", "ES"):
        diam = []
        for view in ("2CH", "4CH"):
            c = cases[f"patient0001_{view}_{phase}"]
            geo = view_geometry(patient_anatomy(2, 1), view, phase)
            m = c.label == 1
            # rotate into the LV axis frame: rows along the axis (tilt is small; widths per row suffice)
            rows = np.nonzero(m.any(1))[0]
            widths = m[rows].sum(1) * c.spacing[1] * np.cos(geo.theta)
            diam.append(np.interp(np.linspace(0, 1, 200), np.linspace(0, 1, len(widths)), widths))
            length = len(rows) * c.spacing[0] / np.cos(geo.theta)
        vols[phase] = np.pi / 4 * np.sum(diam[0] * diam[1]) * length / 200 / 1000
    meta = cases["patient0001_2CH_ED"].meta
    assert vols["ED"] == pytest.approx(meta["EDV"], rel=0.12)
    assert vols["ES"] == pytest.approx(meta["ESV"], rel=0.15)


def _stats(cases) -> dict[str, float]:
    imgs, labs = [c.image.astype(float) for c in cases], [c.label for c in cases]
    inside = [fan_grid(VENDORS[cases[0].meta["domain"]], i.shape).inside for i in imgs]
    mean = np.mean([i[f].mean() for i, f in zip(imgs, inside)])
    blood = np.mean([i[l == 1].mean() for i, l in zip(imgs, labs)])
    myo = np.mean([i[l == 2].mean() for i, l in zip(imgs, labs)])
    # high-frequency energy: mean |Laplacian| inside the fan, away from its border
    hf = np.mean([np.abs(ndi.laplace(i))[ndi.binary_erosion(f, iterations=3)].mean() for i, f in zip(imgs, inside)])
    deep = np.mean([i[int(0.75 * i.shape[0]):][f[int(0.75 * i.shape[0]):]].mean() for i, f in zip(imgs, inside)])
    return {"mean": mean, "contrast": myo - blood, "hf": hf, "deep": deep, "blood": blood}


def test_targets_differ_from_source_in_image_statistics(domains):
    s = {d: _stats(c) for d, c in domains.items()}
    src = s["source"]
    assert s["target-lowgain"]["mean"] < 0.75 * src["mean"]  # under-gained
    assert s["target-lowgain"]["deep"] < 0.7 * src["deep"]  # dark far field (attenuation, weak TGC)
    assert s["target-blur"]["hf"] < 0.6 * src["hf"]  # blurred
    assert s["target-blur"]["blood"] > src["blood"] + 10  # haze in the cavity
    shadow = domains["target-shadow"]
    assert shadow[0].spacing[0] > 1.15 * domains["source"][0].spacing[0]  # deeper sector
    assert np.mean([(c.label > 0).mean() for c in shadow]) < 0.75 * np.mean(
        [(c.label > 0).mean() for c in domains["source"]])  # heart looks smaller
    for d, st in s.items():
        assert st["contrast"] > 10, (d, st)  # anatomy stays visible: myocardium brighter than blood


def test_unknown_domain_lists_valid_ones():
    with pytest.raises(InputError, match="target-blur"):
        generate_domain("nope", 1)
    with pytest.raises(InputError, match="valid domains"):
        apply_vendor_shift(np.zeros((8, 8), np.uint8), "nope", 0)


def test_apply_vendor_shift_on_source_images(domains):
    c = domains["source"][0]
    same, lab = apply_vendor_shift(c.image, "source", 0, c.label)
    np.testing.assert_array_equal(same, c.image)
    np.testing.assert_array_equal(lab, c.label)
    for name in ("target-lowgain", "target-blur", "target-shadow"):
        a, la = apply_vendor_shift(c.image, name, 3, c.label)
        b, lb = apply_vendor_shift(c.image, name, 3, c.label)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
        assert a.dtype == np.uint8 and a.shape == c.image.shape
        assert np.abs(a.astype(float) - c.image).mean() > 5
        assert set(np.unique(la)) == {0, 1, 2, 3}
    _, la = apply_vendor_shift(c.image, "target-shadow", 3, c.label)
    # deeper sector: structures shrink by about the depth ratio along rows and the sector-width ratio along cols
    sp = shifted_spacing(c.spacing, "target-shadow")
    ratio = (c.spacing[0] * c.spacing[1]) / (sp[0] * sp[1])
    assert (la == 1).sum() == pytest.approx((c.label == 1).sum() * ratio, rel=0.15)
    a2, _ = apply_vendor_shift(c.image.astype(np.float32) * 3.0, "target-blur", 3)  # float input works
    assert a2.dtype == np.uint8


def test_apply_vendor_shift_on_real_camus(camus_dir):
    from rl_adapt.data.readers import read_image, read_label

    img, _ = read_image(camus_dir / "imagesTr" / "patient0001_4CH_ED_0000.nii.gz")
    lab, _ = read_label(camus_dir / "labelsTr" / "patient0001_4CH_ED.nii.gz")
    for name in ("target-lowgain", "target-blur", "target-shadow"):
        out, olab = apply_vendor_shift(img, name, 0, lab)
        assert out.shape == img.shape and out.dtype == np.uint8
        blood, myo = out[olab == 1].mean(), out[olab == 2].mean()
        assert myo > blood  # anatomy still recognisable
        for k in (1, 2, 3):
            assert (olab == k).any()


@pytest.mark.parametrize("domain", ["source", "target-lowgain", "target-blur", "target-shadow"])
def test_ground_truth_masks_pass_the_anatomical_checks(domain):
    """Synthetic label maps are plausible anatomy (CAMUS preset), ED and ES, at the demo size."""
    from rl_adapt.measures.anatomy import check_anatomy

    cases = generate_domain(domain, 4, seed=11, size=128)
    failed = {c.name: check_anatomy(c.label).failed for c in cases}
    assert not any(failed.values()), failed
