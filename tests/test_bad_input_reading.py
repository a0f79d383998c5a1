"""Inputs checked before work: truncated/corrupt files, implausible spacing and dataset.json label mappings.

Each bad input must give one InputError naming the file (and the value), exit status 2 with one line on
stderr from the CLI, and leave every input file byte-identical. Files are tiny and written into tmp_path.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from rl_adapt.cli import main
from rl_adapt.data.case import Case
from rl_adapt.data.readers import nnunet_label_map, read_dataset, read_image, read_label
from rl_adapt.data.validate import SPACING_RANGE
from rl_adapt.data.writers import write_nnunet_raw
from rl_adapt.errors import InputError

REPO = Path(__file__).resolve().parents[1]
CAMUS224 = REPO.parent / "shared" / "data" / "Dataset501_CAMUS224"

IMG = np.random.default_rng(0).integers(0, 256, (64, 48)).astype(np.uint8)  # random: gzip cannot shrink it
LAB = np.zeros((64, 48), np.uint8)
LAB[10:30, 15:30], LAB[10:30, 10:15], LAB[30:45, 18:28] = 1, 2, 3
NAME = "patient0001_2CH_ED"


# ------------------------------------------------------------------------------------------- helpers
def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _write(path: Path, array: np.ndarray = IMG, spacing=(0.3, 0.3), compress: bool = True) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing([float(s) for s in spacing[::-1]])
    sitk.WriteImage(img, str(path), compress)
    return path


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _nifti_set_pixdim(path: Path, value: float) -> None:
    """Set the in-plane pixdim of a NIfTI-1 file (either compression) and drop its qform/sform, as a tool
    writing a bad spacing would leave it."""
    raw = path.read_bytes()
    gz = raw[:2] == b"\x1f\x8b"
    hdr = bytearray(gzip.decompress(raw) if gz else raw)
    hdr[80:88] = struct.pack("<2f", value, value)
    hdr[252:256] = struct.pack("<2h", 0, 0)
    path.write_bytes(gzip.compress(bytes(hdr)) if gz else bytes(hdr))


def _metaimage_set_spacing(path: Path, value: str) -> None:
    raw = path.read_bytes()
    start = raw.index(b"ElementSpacing = ")
    end = raw.index(b"\n", start)
    path.write_bytes(raw[:start] + f"ElementSpacing = {value} {value}".encode() + raw[end:])


def _expect(fn, *words: str, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        fn(**kwargs)
    msg = str(info.value)
    assert all(w in msg for w in words), msg
    assert "\n" not in msg
    return msg


def _cli_refuses(capsys, data: Path, *words: str) -> str:
    """``rl-adapt info DATA`` in-process: exit 2, one stderr line with ``words``, inputs untouched."""
    before = _checksums(data)
    capsys.readouterr()
    assert main(["info", str(data)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert "error" in err and "Traceback" not in err + captured.out
    assert all(w in err for w in words), err
    assert _checksums(data) == before
    return err


# ------------------------------------------------------------------------------------------- truncation
def _nii_gz(d: Path) -> Path:
    p = _write(d / "a.nii.gz")
    _cut(p)
    return p


def _nii_gz_trailer(d: Path) -> Path:
    p = _write(d / "a.nii.gz")
    p.write_bytes(p.read_bytes()[:-3])  # the stream's data is whole, its CRC/size trailer is not
    return p


def _nii(d: Path) -> Path:
    p = _write(d / "a.nii", compress=False)
    _cut(p, 0.7)
    return p


def _gz_damaged(d: Path) -> Path:
    p = _write(d / "a.nii.gz")
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(255 - b for b in data[mid:mid + 8])
    p.write_bytes(bytes(data))
    return p


def _mhd_raw(d: Path) -> Path:
    _write(d / "a.mhd", compress=False)
    _cut(d / "a.raw")
    return d / "a.raw"


def _mhd_zraw(d: Path) -> Path:
    _write(d / "a.mhd", compress=True)
    _cut(d / "a.zraw")
    return d / "a.zraw"


def _mha(d: Path) -> Path:
    p = _write(d / "a.mha", compress=False)
    _cut(p, 0.8)
    return p


def _mhd_no_raw(d: Path) -> Path:
    _write(d / "a.mhd", compress=False)
    (d / "a.raw").unlink()
    return d / "a.raw"


TRUNCATED = {
    "nii.gz cut to half": (_nii_gz, "a.nii.gz", ("truncated", "end-of-stream")),
    "nii.gz without trailer": (_nii_gz_trailer, "a.nii.gz", ("truncated",)),
    "nii cut": (_nii, "a.nii", ("truncated", "header promises 3072 bytes of pixel data, the file holds 2044")),
    "gzip bytes damaged": (_gz_damaged, "a.nii.gz", ("damaged compressed data",)),
    "mhd with raw cut to half": (_mhd_raw, "a.raw", ("truncated", "a.mhd promises 3072 bytes of pixel data",
                                                     "holds 1536")),
    "mhd with zraw cut": (_mhd_zraw, "a.zraw", ("truncated", "compressed pixel data")),
    "mha cut": (_mha, "a.mha", ("truncated", "the header promises 3072 bytes")),
    "mhd without its raw": (_mhd_no_raw, "a.raw", ("not found",)),
}


@pytest.mark.parametrize("case", TRUNCATED, ids=list(TRUNCATED))
def test_truncated_or_corrupt_file_is_refused(tmp_path: Path, case: str, capsys):
    make, shown, words = TRUNCATED[case]
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    image = next(p for p in data.iterdir() if p.suffix in (".gz", ".nii", ".mhd", ".mha"))
    before = _checksums(data)
    _expect(lambda: read_image(image), shown, "corrupt", *words)
    _expect(lambda: read_dataset(data), shown, *words)
    assert _checksums(data) == before
    _cli_refuses(capsys, data, shown, words[0])


def test_truncated_label_file_is_named(tmp_path: Path, capsys):
    root = write_nnunet_raw([Case(NAME, IMG, LAB, (0.3, 0.3))], tmp_path / "Dataset910_T")
    _cut(root / "labelsTr" / f"{NAME}.nii.gz")
    _expect(lambda: read_dataset(root), f"labelsTr/{NAME}.nii.gz", "truncated")
    _cli_refuses(capsys, root, f"{NAME}.nii.gz", "truncated")


def test_truncated_float_nifti_with_nan_reports_truncation_first(tmp_path: Path):
    img = IMG.astype(np.float32)
    img[0, 0] = np.nan
    p = _write(tmp_path / "f.nii", img, compress=False)
    _expect(lambda: read_image(p), "f.nii", "NaN/Inf")
    _cut(p)
    _expect(lambda: read_image(p), "f.nii", "truncated")


def test_intact_files_of_every_format_still_read(tmp_path: Path):
    for name, compress in (("a.nii.gz", True), ("b.nii", False), ("c.mhd", False), ("d.mhd", True),
                           ("e.mha", False), ("f.nrrd", True)):
        arr, spacing = read_image(_write(tmp_path / name, compress=compress))
        np.testing.assert_array_equal(arr, IMG)
        np.testing.assert_allclose(spacing, (0.3, 0.3), rtol=1e-6)


def test_gzip_member_followed_by_padding_reads(tmp_path: Path):
    p = _write(tmp_path / "a.nii.gz")
    p.write_bytes(p.read_bytes() + b"\0" * 16)
    np.testing.assert_array_equal(read_image(p)[0], IMG)


# --------------------------------------------------------------------------------------------- spacing
def _spacing_file(d: Path, ext: str, value: float) -> Path:
    if ext in (".nii.gz", ".nii"):
        p = _write(d / f"s{ext}", compress=ext.endswith(".gz"))
        _nifti_set_pixdim(p, value)
    elif ext == ".mhd":
        p = _write(d / "s.mhd", compress=False)
        _metaimage_set_spacing(p, f"{value:g}")
    else:  # formats checked on the spacing ITK reports (it rejects 0, < 0 and NaN itself)
        p = _write(d / f"s{ext}", spacing=(value, value))
    return p


BAD_SPACING = [(ext, v) for ext in (".nii.gz", ".nii", ".mhd") for v in (0.0, -1.0, math.nan, 1000.0, 1e-30)]
BAD_SPACING += [(".nrrd", 1000.0), (".nrrd", 1e-30), (".mha", 1000.0)]


@pytest.mark.parametrize("ext, value", BAD_SPACING, ids=[f"{e}-{v:g}" for e, v in BAD_SPACING])
def test_implausible_spacing_is_refused(tmp_path: Path, ext: str, value: float, capsys):
    data = tmp_path / "data"
    data.mkdir()
    p = _spacing_file(data, ext, value)
    shown = f"{value:g} x {value:g} mm"
    lo, hi = SPACING_RANGE
    _expect(lambda: read_image(p), p.name, shown, f"from {lo:g} to {hi:g} mm")
    _cli_refuses(capsys, data, p.name, shown)


@pytest.mark.parametrize("ext", [".nii.gz", ".mhd", ".nrrd"])
def test_spacing_range_can_be_widened(tmp_path: Path, ext: str):
    data = tmp_path / "data"
    data.mkdir()
    p = _spacing_file(data, ext, 1000.0)
    with pytest.raises(InputError):
        read_dataset(data)
    (case,) = read_dataset(data, spacing_range=(0.001, 2000.0))
    assert case.spacing == pytest.approx((1000.0, 1000.0))
    assert read_image(p, spacing_range=(0.001, math.inf))[1] == pytest.approx((1000.0, 1000.0))
    with pytest.raises(InputError, match="from 1 to 2 mm"):  # and narrowed
        read_image(_write(data / "fine.nii.gz"), spacing_range=(1.0, 2.0))


def test_zero_spacing_is_refused_whatever_the_range(tmp_path: Path):
    p = _spacing_file(tmp_path, ".nii", 0.0)
    _expect(lambda: read_image(p, spacing_range=(1e-9, math.inf)), "s.nii", "0 x 0 mm")
    with pytest.raises(ValueError, match="spacing_range"):
        read_dataset(tmp_path, spacing_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="spacing_range"):
        read_dataset(tmp_path, spacing_range=(2.0, 1.0))


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.154, 0.308), (0.01, 10.0), (4.5, 6.4)])
def test_plausible_spacing_passes(tmp_path: Path, spacing):
    """1 x 1 (resized CAMUS224), native CAMUS, the range's ends and a coarse synthetic grid."""
    for ext in (".nii.gz", ".mhd"):
        assert read_image(_write(tmp_path / f"a{ext}", spacing=spacing))[1] == pytest.approx(spacing, rel=1e-6)


@pytest.mark.parametrize("unit, pixdim", [(1, 0.0003), (3, 300.0), (2, 0.3), (0, 0.3)])
def test_nifti_spacing_units_are_honoured(tmp_path: Path, unit: int, pixdim: float):
    """xyzt_units metre/micron/mm/unknown: ITK reports mm, and so does the header check."""
    p = _write(tmp_path / "u.nii", compress=False)
    raw = bytearray(p.read_bytes())
    raw[123] = unit | (raw[123] & 0x38)
    raw[80:88] = struct.pack("<2f", pixdim, pixdim)
    raw[252:256] = struct.pack("<2h", 0, 0)
    p.write_bytes(bytes(raw))
    assert read_image(p)[1] == pytest.approx((0.3, 0.3), rel=1e-6)
    raw[80:88] = struct.pack("<2f", pixdim * 1000, pixdim * 1000)  # 300 mm whatever the unit
    p.write_bytes(bytes(raw))
    _expect(lambda: read_image(p), "u.nii", "300 x 300 mm")


@pytest.mark.skipif(not (CAMUS224 / "imagesTr").is_dir(), reason="shared CAMUS224 data not present")
def test_camus224_files_pass_untouched():
    image = sorted((CAMUS224 / "imagesTr").glob("*_0000.nii.gz"))[0]
    label = CAMUS224 / "labelsTr" / image.name.replace("_0000", "")
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (image, label)]
    assert read_image(image)[1] == (1.0, 1.0)
    assert read_label(label)[0].max() <= 3
    assert nnunet_label_map(json.loads((CAMUS224 / "dataset.json").read_text()), CAMUS224 / "dataset.json") is None
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in (image, label)] == before


# ---------------------------------------------------------------------------------------------- labels
STANDARD = {"background": 0, "LV": 1, "MYO": 2, "LA": 3}


def _dataset(root: Path, labels, file_values: dict[int, int] | None = None) -> Path:
    """An nnU-Net dataset of one case whose dataset.json says ``labels`` and whose label file stores
    project class c as ``file_values[c]``."""
    write_nnunet_raw([Case(NAME, IMG, LAB, (0.3, 0.3))], root)
    if file_values is not None:
        stored = np.zeros_like(LAB)
        for cls, value in file_values.items():
            stored[LAB == cls] = value
        _write(root / "labelsTr" / f"{NAME}.nii.gz", stored)
    ds = json.loads((root / "dataset.json").read_text())
    ds["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(ds))
    return root


HONOURED = {
    "standard": (STANDARD, None),
    "permuted": ({"background": 0, "LA": 1, "MYO": 2, "LV": 3}, {0: 0, 1: 3, 2: 2, 3: 1}),
    "long names": ({"Background": 0, "left atrium": 1, "left_ventricle": 2, "Myocardium": 3}, {0: 0, 1: 2, 2: 3, 3: 1}),
    "CAMUS names": ({"background": 0, "LV endocardium": 1, "LV epicardium": 2, "left-atrium": 3}, None),
    "nnU-Net v1 form": ({"0": "background", "1": "LA", "2": "LV", "3": "MYO"}, {0: 0, 1: 2, 2: 3, 3: 1}),
    "sparse values": ({"background": 0, "LV": 10, "MYO": 20, "LA": 30}, {0: 0, 1: 10, 2: 20, 3: 30}),
}


@pytest.mark.parametrize("kind", HONOURED, ids=list(HONOURED))
def test_label_mapping_is_honoured(tmp_path: Path, kind: str):
    labels, file_values = HONOURED[kind]
    root = _dataset(tmp_path / "Dataset911_L", labels, file_values)
    before = _checksums(root)
    (case,) = read_dataset(root)
    np.testing.assert_array_equal(case.label, LAB)  # LV stays LV, LA stays LA, whatever the file stores
    assert case.label.dtype == np.uint8
    assert _checksums(root) == before


def test_permuted_mapping_is_not_ignored(tmp_path: Path):
    """The same label file means something else when dataset.json swaps LV and LA."""
    root = _dataset(tmp_path / "Dataset912_L", {"background": 0, "LA": 1, "MYO": 2, "LV": 3})
    (case,) = read_dataset(root)
    assert (case.label[LAB == 1] == 3).all() and (case.label[LAB == 3] == 1).all()
    assert (case.label[LAB == 2] == 2).all()


REFUSED = {
    "unknown name": ({"background": 0, "LV": 1, "MYO": 2, "RV": 3}, "'RV' not recognised"),
    "regions": ({"background": 0, "heart": [1, 2, 3], "LV": 1}, "region-based"),
    "ignore label": ({"background": 0, "LV": 1, "MYO": 2, "LA": 3, "ignore": 4}, "'ignore' label"),
    "class named twice": ({"background": 0, "LV": 1, "left ventricle": 2}, "both name LV"),
    "value used twice": ({"background": 0, "LV": 1, "MYO": 1}, "value 1 is given to two classes"),
    "no background": ({"LV": 1, "MYO": 2, "LA": 3}, "no background"),
    "string value": ({"background": 0, "LV": "1"}, "not a non-negative integer"),
    "float value": ({"background": 0, "LV": 1.5}, "not a non-negative integer"),
    "negative value": ({"background": 0, "LV": -1}, "not a non-negative integer"),
    "empty": ({}, "cannot be understood"),
    "a list": (["background", "LV"], "cannot be understood"),
}


@pytest.mark.parametrize("kind", REFUSED, ids=list(REFUSED))
def test_label_mapping_that_cannot_be_honoured_is_refused(tmp_path: Path, kind: str, capsys):
    labels, words = REFUSED[kind]
    root = _dataset(tmp_path / "Dataset913_L", labels)
    msg = _expect(lambda: read_dataset(root), "dataset.json", words)
    assert '"LV": 1' in msg or "expected" not in msg  # says what is expected
    _cli_refuses(capsys, root, "dataset.json", words)


def test_regions_class_order_is_refused(tmp_path: Path):
    root = _dataset(tmp_path / "Dataset914_L", STANDARD)
    ds = json.loads((root / "dataset.json").read_text())
    ds["regions_class_order"] = [1, 2, 3]
    (root / "dataset.json").write_text(json.dumps(ds))
    _expect(lambda: read_dataset(root), "dataset.json", "region-based")


def test_label_value_not_declared_is_refused(tmp_path: Path, capsys):
    root = _dataset(tmp_path / "Dataset915_L", {"background": 0, "LV": 1, "MYO": 2})  # file still holds 3 (LA)
    _expect(lambda: read_dataset(root), f"{NAME}.nii.gz", "label value(s) 3 not declared", "0 background, 1 LV")
    _cli_refuses(capsys, root, f"{NAME}.nii.gz", "not declared")


def test_images_only_reading_does_not_need_the_label_mapping(tmp_path: Path):
    root = _dataset(tmp_path / "Dataset916_L", {"background": 0, "RV": 1})
    (case,) = read_dataset(root, with_labels=False)
    assert case.label is None


def test_written_datasets_round_trip(tmp_path: Path):
    root = write_nnunet_raw([Case(NAME, IMG, LAB, (0.3, 0.3))], tmp_path / "Dataset917_L")
    assert nnunet_label_map(json.loads((root / "dataset.json").read_text()), root / "dataset.json") is None
    np.testing.assert_array_equal(read_dataset(root)[0].label, LAB)


# ------------------------------------------------------------------------------------ the real command
@pytest.mark.parametrize("kind", ["truncated", "spacing", "labels"])
def test_console_command_prints_one_line(tmp_path: Path, kind: str):
    """Through a real process, so messages ITK would print from C++ to stderr would show too."""
    data = tmp_path / "data"
    data.mkdir()
    if kind == "truncated":
        _nii_gz(data)
    elif kind == "spacing":
        _spacing_file(data, ".nii.gz", 0.0)
    else:
        data = _dataset(tmp_path / "Dataset918_L", {"background": 0, "LV": 1, "MYO": 2, "RV": 3})
    before = _checksums(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "rl_adapt.cli", "info", str(data)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert ("dataset.json" if kind == "labels" else "data/") in proc.stderr
    assert _checksums(data) == before
