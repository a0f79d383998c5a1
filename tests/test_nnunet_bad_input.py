"""Bad model folders: clear InputError naming the problem; the CLI exits 2 and writes nothing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from rl_adapt.cli import main
from rl_adapt.errors import InputError
from rl_adapt.policies.nnunet import (CAMUS_LABELS, NnUNetModel, export_model_folder, load_model_folder,
                                      plain_unet_plans)

LABELS = dict(CAMUS_LABELS)


def _plans(features=(4, 8), patch=(32, 32), ndim=2) -> dict:
    """A minimal valid nnU-Net v2 plans.json for a PlainConvUNet (schema of ExperimentPlanner's output)."""
    return plain_unet_plans(features, patch, spacing=0.3, batch_size=2, n_conv_per_stage=1, ndim=ndim,
                            dataset_name="Dataset902_Bad")


DATASET_JSON = {"channel_names": {"0": "US"}, "labels": LABELS, "numTraining": 1, "file_ending": ".nii.gz"}


@pytest.fixture()
def good(tmp_path) -> Path:
    model = NnUNetModel.from_plans(_plans(), DATASET_JSON, seed=0)
    return export_model_folder(model.network, model, tmp_path / "results")


@pytest.fixture()
def images(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    im = sitk.GetImageFromArray(np.random.default_rng(0).integers(1, 255, (40, 36)).astype(np.uint8))
    im.SetSpacing((0.3, 0.3))
    sitk.WriteImage(im, str(d / "a.nii.gz"))
    return d


def _cli_predict(model: Path, images: Path, out: Path, capsys, *extra) -> tuple[int, str]:
    code = main(["predict", "--model", str(model), "--images", str(images), "--out", str(out), "--no-progress", *extra])
    return code, capsys.readouterr().err


def test_good_folder_predicts_via_cli(good, images, tmp_path, capsys):
    code, err = _cli_predict(good.parent.parent, images, tmp_path / "out", capsys)
    assert code == 0, err
    mask = sitk.ReadImage(str(tmp_path / "out" / "a.nii.gz"))
    assert mask.GetSize() == (36, 40) and mask.GetSpacing() == pytest.approx((0.3, 0.3))
    ref = load_model_folder(good).predict(sitk.GetArrayFromImage(sitk.ReadImage(str(images / "a.nii.gz"))), (0.3, 0.3))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), ref)


def test_not_a_results_folder(tmp_path, images, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not an nnU-Net results folder"):
        load_model_folder(tmp_path / "empty")
    code, err = _cli_predict(tmp_path / "empty", images, tmp_path / "out", capsys)
    assert code == 2 and "not an nnU-Net results folder" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_missing_fold(good, images, tmp_path, capsys):
    with pytest.raises(InputError, match=r"fold 3 not found \(available: fold_0\)"):
        load_model_folder(good, folds=(3,))
    code, err = _cli_predict(good, images, tmp_path / "out", capsys, "--folds", "0,3")
    assert code == 2 and "fold 3 not found" in err
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_file(good):
    with pytest.raises(InputError, match="checkpoint missing .*checkpoint_final.pth"):
        load_model_folder(good, checkpoint="checkpoint_best.pth")


def test_checkpoint_for_a_different_plan(good, images, tmp_path, capsys):
    bad = tmp_path / "bad" / good.name
    shutil.copytree(good, bad)
    (bad / "plans.json").write_text(json.dumps(_plans(features=(8, 16))))
    with pytest.raises(InputError, match=r"does not fit the network of plans.json .*shape mismatch"):
        load_model_folder(bad)
    code, err = _cli_predict(bad, images, tmp_path / "out", capsys)
    assert code == 2 and "shape mismatch" in err
    assert not (tmp_path / "out").exists()


def test_3d_configuration(good, tmp_path):
    bad = tmp_path / "bad3d" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(good, bad)
    plans = _plans()
    plans["configurations"]["3d_fullres"] = _plans(patch=(16, 32, 32), ndim=3)["configurations"]["2d"]
    (bad / "plans.json").write_text(json.dumps(plans))
    ckpt = torch.load(bad / "fold_0" / "checkpoint_final.pth", weights_only=False)
    ckpt["init_args"]["configuration"] = "3d_fullres"
    torch.save(ckpt, bad / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(InputError, match="configuration '3d_fullres' is 3D.*only 2D"):
        load_model_folder(bad)


def test_unexpected_label_set(good, tmp_path, images, capsys):
    with pytest.raises(InputError, match="label set .* differs from the expected"):
        load_model_folder(good, expected_labels={"background": 0, "LV": 1})
    bad = tmp_path / "badlab" / good.name
    shutil.copytree(good, bad)
    dj = dict(DATASET_JSON, labels={"background": 0, "LV": 1, "MYO": 2, "LA": 5})
    (bad / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(InputError, match="labels must be 0..K-1"):
        load_model_folder(bad)
    dj = dict(DATASET_JSON, labels={"background": 0, "heart": [1, 2], "LV": 1})
    (bad / "dataset.json").write_text(json.dumps(dj))
    code, err = _cli_predict(bad, images, tmp_path / "out", capsys)
    assert code == 2 and "region-based" in err and not (tmp_path / "out").exists()


def test_corrupt_checkpoint(good, tmp_path):
    bad = tmp_path / "corrupt" / good.name
    shutil.copytree(good, bad)
    (bad / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable torch checkpoint"):
        load_model_folder(bad)


def test_bad_image_input(good):
    model = load_model_folder(good)
    with pytest.raises(InputError, match="expected a 2D image"):
        model.predict(np.zeros((2, 8, 8)), (0.3, 0.3))
    with pytest.raises(InputError, match="spacing"):
        model.predict(np.ones((8, 8)), (0.3, -1))
    with pytest.raises(InputError, match="NaN"):
        model.predict(np.full((8, 8), np.nan), (0.3, 0.3))


def test_pretrain_rejects_non_dataset(tmp_path, capsys):
    (tmp_path / "nodata").mkdir()
    code = main(["pretrain", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "m"), "--no-progress"])
    assert code == 2 and "not an nnU-Net raw dataset" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
