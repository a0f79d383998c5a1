"""Every kind of bad input gives one clear InputError naming the file, exit 2 from the CLI, no partial output."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from rl_adapt.cli import main
from rl_adapt.data.case import Case
from rl_adapt.data.readers import read_dataset, read_image, read_label
from rl_adapt.data.writers import write_camus, write_image, write_mask, write_nnunet_raw
from rl_adapt.errors import InputError

IMG = np.arange(16 * 12, dtype=np.uint8).reshape(16, 12)
LAB = np.zeros((16, 12), np.uint8)
LAB[4:8, 4:8] = 1


def _nnunet(root: Path, image: np.ndarray = IMG, label: np.ndarray = LAB, lspacing=(1.0, 1.0)) -> Path:
    write_nnunet_raw([Case("patient0001_2CH_ED", IMG, LAB, (1.0, 1.0))], root)
    write_image(root / "imagesTr" / "patient0001_2CH_ED_0000.nii.gz", image)
    lab = sitk.GetImageFromArray(label)
    lab.SetSpacing(tuple(lspacing[::-1]))
    sitk.WriteImage(lab, str(root / "labelsTr" / "patient0001_2CH_ED.nii.gz"))
    return root


def _expect(path_part: str, words: str, fn, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert path_part in msg and words in msg, msg
    assert "\n" not in msg
    return info.value


def _cli_fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
    return err


def test_missing_file(tmp_path: Path):
    _expect("nope.nii.gz", "not found", read_image, tmp_path / "nope.nii.gz")


def test_missing_label_in_nnunet(tmp_path: Path, capsys):
    root = _nnunet(tmp_path / "ds")
    (root / "labelsTr" / "patient0001_2CH_ED.nii.gz").unlink()
    _expect("patient0001_2CH_ED.nii.gz", "label file not found", read_dataset, root)
    assert "label file not found" in _cli_fails(capsys, "info", str(root))


@pytest.mark.parametrize("content", [b"", b"this is not an image at all" * 10, "truncated"])
def test_corrupt_image(tmp_path: Path, content, capsys):
    bad = tmp_path / "bad.nii.gz"
    if content == "truncated":
        write_image(bad, IMG)
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        bad.write_bytes(gzip.compress(content) if content else b"")
    _expect("bad.nii.gz", "unreadable or corrupt", read_image, bad)
    assert "bad.nii.gz" in _cli_fails(capsys, "info", str(tmp_path))


def test_corrupt_png(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _expect("x.png", "unreadable or corrupt", read_image, tmp_path / "x.png")


def test_3d_volume_where_2d_expected(tmp_path: Path, capsys):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 16, 12), np.uint8)), str(tmp_path / "vol.nii.gz"))
    _expect("vol.nii.gz", "3D volume", read_image, tmp_path / "vol.nii.gz")
    assert "3D volume" in _cli_fails(capsys, "info", str(tmp_path))


def test_label_values_outside_range(tmp_path: Path, capsys):
    lab = LAB.copy()
    lab[0, 0] = 5
    root = _nnunet(tmp_path / "ds", label=lab)
    _expect("patient0001_2CH_ED.nii.gz", "outside 0..3: 5", read_dataset, root)
    _cli_fails(capsys, "info", str(root))
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 4), 1.5, np.float32)), str(tmp_path / "f.nii.gz"))
    _expect("f.nii.gz", "non-integer", read_label, tmp_path / "f.nii.gz")


def test_size_mismatch(tmp_path: Path, capsys):
    root = _nnunet(tmp_path / "ds", label=np.zeros((16, 10), np.uint8))
    _expect("labelsTr", "does not match image size", read_dataset, root)
    _cli_fails(capsys, "info", str(root))


def test_spacing_mismatch(tmp_path: Path, capsys):
    root = _nnunet(tmp_path / "ds", lspacing=(1.0, 0.5))
    _expect("labelsTr", "spacing", read_dataset, root)
    _cli_fails(capsys, "info", str(root))


def test_empty_folder(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    _expect("empty", "no images", read_dataset, tmp_path / "empty")
    assert "no images" in _cli_fails(capsys, "info", str(tmp_path / "empty"))
    _cli_fails(capsys, "info", str(tmp_path / "does_not_exist"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_nan_inf_pixels(tmp_path: Path, bad, ext, capsys):
    """ITK's NIfTI reader turns NaN/Inf into 0; the reader must still notice them."""
    img = IMG.astype(np.float32)
    img[3, 3] = bad
    sitk.WriteImage(sitk.GetImageFromArray(img), str(tmp_path / f"n{ext}"))
    _expect(f"n{ext}", "NaN/Inf", read_image, tmp_path / f"n{ext}")
    _cli_fails(capsys, "info", str(tmp_path))


def test_bad_dataset_json(tmp_path: Path):
    root = _nnunet(tmp_path / "ds")
    (root / "dataset.json").write_text("{not json")
    _expect("dataset.json", "not valid JSON", read_dataset, root)
    (root / "dataset.json").write_text('{"channel_names": {"0": "US", "1": "X"}, "labels": {}, "file_ending": ".nii.gz"}')
    _expect("dataset.json", "one input channel", read_dataset, root)


def test_writers_leave_no_partial_output(tmp_path: Path):
    good = Case("patient0001_2CH_ED", IMG, LAB, (1.0, 1.0), {"patient": "patient0001", "view": "2CH", "phase": "ED"})
    nan = Case("patient0002_2CH_ED", IMG.astype(np.float32), LAB, (1.0, 1.0),
               {"patient": "patient0002", "view": "2CH", "phase": "ED"})
    nan.image[0, 0] = np.nan
    for writer in (write_nnunet_raw, write_camus):
        with pytest.raises(InputError, match="NaN"):
            writer([good, nan], tmp_path / "out")
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="outside 0..3"):
        write_mask(tmp_path / "m.nii.gz", np.full((4, 4), 7, np.uint8))
    with pytest.raises(InputError, match="does not match"):
        write_mask(tmp_path / "m.nii.gz", LAB[:4], like=good)
    with pytest.raises(InputError, match="no label map"):
        write_nnunet_raw([Case("a", IMG)], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused(tmp_path: Path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        write_nnunet_raw([Case("a", IMG, LAB)], tmp_path / "out")
