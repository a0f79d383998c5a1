"""Round trips through every layout: values, spacing and orientation survive writing and reading."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from rl_adapt.data.case import Case
from rl_adapt.data.readers import (detect_format, read_dataset, read_image, read_info_cfg, read_label,
                                   read_sequence)
from rl_adapt.data.writers import write_camus, write_image, write_mask, write_nnunet_raw

SPACING = (0.31, 0.27)


def _marked_image(h: int = 24, w: int = 20, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    """Random image with an asymmetric marker: a bright pixel near the top-left, dark row at the bottom."""
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 200, (h, w)).astype(dtype)
    img[2, 3] = 255
    img[-1, :] = 0
    return img


def _label(h: int = 24, w: int = 20) -> np.ndarray:
    lab = np.zeros((h, w), np.uint8)
    lab[3:12, 6:14] = 1
    lab[3:12, 4:6] = 2
    lab[12:18, 7:13] = 3
    return lab


def _cases(n_patients: int = 2, labelled: bool = True) -> list[Case]:
    cases = []
    for p in range(1, n_patients + 1):
        for view in ("2CH", "4CH"):
            for phase in ("ED", "ES"):
                name = f"patient{p:04d}_{view}_{phase}"
                meta = {"patient": f"patient{p:04d}", "view": view, "phase": phase, "EF": 50.0 + p,
                        "EDV": 100.0 + p, "ESV": 49.0, "quality": "Good", "sex": "F", "age": 60,
                        "ed_frame": 1, "es_frame": 12, "nb_frames": 15,
                        "split": "validation" if p == 2 else "training"}
                cases.append(Case(name, _marked_image(seed=p), _label() if labelled else None, SPACING, meta))
    return cases


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mhd", ".mha", ".nrrd"])
def test_image_round_trip_keeps_values_spacing_orientation(tmp_path: Path, ext: str):
    img = _marked_image()
    path = write_image(tmp_path / f"img{ext}", img, SPACING)
    back, spacing = read_image(path)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, img)
    assert np.unravel_index(np.argmax(back), back.shape) == (2, 3)  # marker stays top-left
    np.testing.assert_allclose(spacing, SPACING, rtol=1e-6)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers


def test_png_and_float_round_trip(tmp_path: Path):
    img = _marked_image()
    back, spacing = read_image(write_image(tmp_path / "a.png", img))
    np.testing.assert_array_equal(back, img)
    assert spacing == (1.0, 1.0)
    f = _marked_image(dtype=np.float32) / 7.0
    back, _ = read_image(write_image(tmp_path / "f.nii.gz", f, SPACING))
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, f)


def test_rgb_png_becomes_grey(tmp_path: Path):
    rgb = np.stack([_marked_image()] * 3, -1)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.png"))
    back, _ = read_image(tmp_path / "rgb.png")
    np.testing.assert_array_equal(back, rgb[..., 0])


def test_singleton_3d_is_squeezed_and_mask_keeps_its_geometry(tmp_path: Path):
    img = _marked_image()
    vol = sitk.GetImageFromArray(img[None])  # (1, H, W): a 2D image stored as 3D
    vol.SetSpacing((SPACING[1], SPACING[0], 5.0))
    vol.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(vol, str(tmp_path / "s.nii.gz"))
    back, spacing = read_image(tmp_path / "s.nii.gz")
    assert back.shape == img.shape
    np.testing.assert_array_equal(back, img)
    np.testing.assert_allclose(spacing, SPACING, rtol=1e-6)
    case = Case("s", back, None, spacing, source=str(tmp_path / "s.nii.gz"))
    write_mask(tmp_path / "s_mask.nii.gz", _label(), like=case)
    m = sitk.ReadImage(str(tmp_path / "s_mask.nii.gz"))
    assert m.GetSize() == vol.GetSize() and m.GetOrigin() == vol.GetOrigin()
    np.testing.assert_allclose(m.GetSpacing(), vol.GetSpacing())
    lab, lsp = read_label(tmp_path / "s_mask.nii.gz")
    np.testing.assert_array_equal(lab, _label())
    np.testing.assert_allclose(lsp, SPACING, rtol=1e-6)


def test_mask_copies_origin_and_direction_of_2d_source(tmp_path: Path):
    img = sitk.GetImageFromArray(_marked_image())
    img.SetSpacing((0.2, 0.4))
    img.SetOrigin((-3.0, 7.0))
    sitk.WriteImage(img, str(tmp_path / "a.nii.gz"))
    arr, sp = read_image(tmp_path / "a.nii.gz")
    case = Case("a", arr, None, sp, source=str(tmp_path / "a.nii.gz"))
    write_mask(tmp_path / "a_gt.nii.gz", _label(), like=case)
    m = sitk.ReadImage(str(tmp_path / "a_gt.nii.gz"))
    assert m.GetOrigin() == (-3.0, 7.0) and m.GetSpacing() == pytest.approx((0.2, 0.4))
    assert m.GetPixelID() == sitk.sitkUInt8


def test_sequence_reads_frames_first(tmp_path: Path):
    seq = np.stack([_marked_image(seed=s) for s in range(5)])  # (T, H, W)
    im = sitk.GetImageFromArray(seq)
    im.SetSpacing((SPACING[1], SPACING[0], 1.0))
    sitk.WriteImage(im, str(tmp_path / "patient0001_2CH_half_sequence.nii.gz"))
    frames, spacing = read_sequence(tmp_path / "patient0001_2CH_half_sequence.nii.gz")
    assert frames.shape == (5, 24, 20) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, seq)
    np.testing.assert_allclose(spacing, SPACING, rtol=1e-6)


def test_camus2023_round_trip(tmp_path: Path):
    cases = _cases()
    out = write_camus(cases, tmp_path / "camus")
    assert detect_format(out) == "camus2023"
    assert (out / "database_split" / "subgroup_validation.txt").read_text().split() == ["patient0002"]
    info = read_info_cfg(out / "database_nifti" / "patient0001" / "Info_4CH.cfg")
    assert info["EF"] == 51 and info["nb_frames"] == 15 and info["quality"] == "Good"
    back = read_dataset(out)
    assert [c.name for c in back] == [c.name for c in cases]
    for a, b in zip(cases, back):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_allclose(b.spacing, SPACING, rtol=1e-6)
        assert (b.patient, b.view, b.phase) == (a.patient, a.view, a.phase)
        assert b.meta["EF"] == pytest.approx(a.meta["EF"]) and b.meta["split"] == a.meta["split"]
    # database_nifti itself is also accepted; images-only reading skips labels.
    assert all(c.label is None for c in read_dataset(out / "database_nifti", with_labels=False))


def test_camus2019_mhd_layout(tmp_path: Path):
    root = tmp_path / "camus2019" / "training" / "patient0007"
    img, lab = _marked_image(), _label()
    for view in ("2CH", "4CH"):
        for phase in ("ED", "ES"):
            write_image(root / f"patient0007_{view}_{phase}.mhd", img, SPACING)
            write_mask(root / f"patient0007_{view}_{phase}_gt.mhd", lab, spacing=SPACING)
        (root / f"Info_{view}.cfg").write_text("ED: 1\nES: 14\nNbFrame: 15\nSex: M\nAge: 71\n"
                                               "ImageQuality: Medium\nLVedv: 120.5\nLVesv: 60.25\nLVef: 50\n")
    assert detect_format(tmp_path / "camus2019") == "camus2019"
    back = read_dataset(tmp_path / "camus2019")
    assert len(back) == 4
    c = back[0]
    assert c.name == "patient0007_2CH_ED" and c.meta["split"] == "training"
    assert c.meta["EDV"] == 120.5 and c.meta["ESV"] == 60.25 and c.meta["EF"] == 50
    np.testing.assert_array_equal(c.image, img)
    np.testing.assert_array_equal(c.label, lab)
    np.testing.assert_allclose(c.spacing, SPACING, rtol=1e-6)


def test_nnunet_round_trip_with_meta_and_splits(tmp_path: Path):
    cases = _cases()
    out = write_nnunet_raw(cases, tmp_path / "Dataset901_T", dataset_name="Dataset901_T")
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "US"}
    assert ds["labels"] == {"background": 0, "LV": 1, "MYO": 2, "LA": 3}
    assert ds["numTraining"] == 8 and ds["file_ending"] == ".nii.gz"
    assert sorted(os.listdir(out / "imagesTr"))[0] == "patient0001_2CH_ED_0000.nii.gz"
    (out / "splits_groups.json").write_text(json.dumps({"train": [c.name for c in cases[:4]],
                                                        "val": [c.name for c in cases[4:]]}))
    back = read_dataset(out)
    assert detect_format(out) == "nnunet"
    for a, b in zip(cases, back):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_allclose(b.spacing, SPACING, rtol=1e-6)
        assert b.meta["EF"] == a.meta["EF"] and b.view == a.view
    assert [c.meta["split"] for c in back] == ["train"] * 4 + ["val"] * 4


def test_nnunet_unlabelled_goes_to_imagesTs(tmp_path: Path):
    cases = _cases(1, labelled=False)
    for c in cases:
        del c.meta["split"]
    out = write_nnunet_raw(cases, tmp_path / "ts", labelled=False)
    assert len(os.listdir(out / "imagesTs")) == 4 and not (out / "labelsTr").exists()
    back = read_dataset(out)
    assert all(c.label is None and c.meta["split"] == "test" for c in back)


def test_nnunet_raw_passes_nnunet_integrity_check(tmp_path: Path):
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    out = write_nnunet_raw(_cases(), tmp_path / "Dataset902_Check")
    verify.verify_dataset_integrity(str(out), num_processes=1)


def test_folder_of_mixed_files(tmp_path: Path):
    img, lab = _marked_image(), _label()
    write_image(tmp_path / "a.png", img)
    write_image(tmp_path / "b.nii.gz", img, SPACING)
    write_mask(tmp_path / "b_gt.nii.gz", lab, spacing=SPACING)
    write_image(tmp_path / "c_0000.mhd", img, SPACING)
    (tmp_path / "notes.txt").write_text("ignored")
    assert detect_format(tmp_path) == "folder"
    back = read_dataset(tmp_path)
    assert [c.name for c in back] == ["a", "b", "c"]
    assert back[0].label is None and back[2].label is None
    np.testing.assert_array_equal(back[1].label, lab)
    for c in back:
        np.testing.assert_array_equal(c.image, img)


def test_real_camus_reads_apex_up(camus_dir: Path, tmp_path: Path):
    """A subset of the real data (symlinked, never copied): uint8, 224x224, apex up, splits parsed."""
    sub = tmp_path / "Dataset501_sub"
    (sub / "imagesTr").mkdir(parents=True)
    (sub / "labelsTr").mkdir()
    for f in ("dataset.json", "splits_official.json"):
        (sub / f).symlink_to(camus_dir / f)
    names = sorted(p.name[:-12] for p in (camus_dir / "imagesTr").glob("patient000[1-5]_*_0000.nii.gz"))
    assert len(names) == 20
    for n in names:
        (sub / "imagesTr" / f"{n}_0000.nii.gz").symlink_to(camus_dir / "imagesTr" / f"{n}_0000.nii.gz")
        (sub / "labelsTr" / f"{n}.nii.gz").symlink_to(camus_dir / "labelsTr" / f"{n}.nii.gz")
    cases = read_dataset(sub)
    assert len(cases) == 20
    for c in cases:
        assert c.image.dtype == np.uint8 and c.image.shape == (224, 224) and c.meta["split"] == "train"
        assert set(np.unique(c.label)) == {0, 1, 2, 3}
        rows = {k: np.nonzero(c.label == k)[0].mean() for k in (1, 3)}
        assert rows[1] < rows[3]  # LV above LA: apex at the top
        assert c.image[:5, :20].max() == 0  # top-left corner outside the fan is black


@pytest.mark.slow
def test_real_camus_reads_all(camus_dir: Path):
    cases = read_dataset(camus_dir)
    assert len(cases) == 1800 and all(c.label is not None for c in cases)
