"""nnU-Net v2 policy: preprocessing and prediction parity with nnunetv2 itself, export/load, patches, folds.

A tiny raw dataset (64x64 SimpleITK images) is planned with nnU-Net's own planner and shrunk to a 3-stage,
4..16-feature network with a 32x32 patch, so the sliding window runs 3x3 tiles.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from rl_adapt.errors import InputError
from rl_adapt.policies.nnunet import (CAMUS_LABELS, NnUNetModel, export_model_folder, load_model_folder,
                                      plan_dataset, resolve_model_folder, shrink_plan)


def synth_case(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Ellipse LV in a MYO ring above an LA, speckle, zero outside a sector: (image uint8, label uint8)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.normal(0, 2), size * 0.4 + rng.normal(0, 2)
    a, b, t = size * 0.15, size * 0.25, 3.0
    e = ((xx - cx) / (a + t)) ** 2 + ((yy - cy) / (b + t)) ** 2 <= 1
    lab = np.zeros((size, size), np.uint8)
    lab[e] = 2
    lab[((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1] = 1
    lab[(((xx - cx) / a) ** 2 + ((yy - cy - b - t - size * 0.1) / (size * 0.1)) ** 2 <= 1) & ~e] = 3
    img = np.array([0.3, 0.1, 0.8, 0.15])[lab] + 0.2 * gaussian_filter(rng.normal(size=(size, size)), 1)
    sector = np.abs(np.arctan2(xx - size / 2, yy + 1)) < np.deg2rad(42)
    img = np.clip(img, 0, 1) * sector
    lab[~sector] = 0
    return (img * 255).astype(np.uint8), lab


def write_raw_dataset(root: Path, n: int = 6, seed: int = 0, size: int = 64, spacing=(0.3, 0.3),
                      name: str = "Dataset901_Tiny") -> Path:
    """An nnU-Net raw dataset with ``n`` labelled 2D cases (CAMUS label set)."""
    out = root / name
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        img, lab = synth_case(rng, size)
        for arr, path in ((img, out / "imagesTr" / f"case{i:03d}_0000.nii.gz"), (lab, out / "labelsTr" / f"case{i:03d}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((spacing[1], spacing[0]))
            sitk.WriteImage(im, str(path))
    (out / "dataset.json").write_text(json.dumps({"channel_names": {"0": "US"}, "labels": CAMUS_LABELS,
                                                  "numTraining": n, "file_ending": ".nii.gz"}))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(raw dataset dir, small plans, dataset_json, exported model folder) with seeded random weights."""
    root = tmp_path_factory.mktemp("nnunet")
    raw = write_raw_dataset(root / "raw")
    plans, dataset_json, _ = plan_dataset(raw)
    small = shrink_plan(plans, [4, 8, 16], [32, 32], 4, fit_median_to_patch=False)
    model = NnUNetModel.from_plans(small, dataset_json, seed=0, mirror_axes=(0, 1))
    with torch.no_grad():  # make the logits less flat than nnU-Net's init so ties are rare
        for p in model.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = export_model_folder(model.network, model, root / "results")
    return raw, small, dataset_json, folder


def _predictor(folder: Path, mirror: bool = False):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror, device=torch.device("cpu"),
                           verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
    return pred


def _images(n=3, seed=5, size=64):
    rng = np.random.default_rng(seed)
    return [synth_case(rng, size)[0] for _ in range(n)]


def test_plan_is_nnunet_schema(tiny):
    raw, plans, dataset_json, folder = tiny
    cfg = plans["configurations"]["2d"]
    assert cfg["patch_size"] == [32, 32]
    assert cfg["architecture"]["arch_kwargs"]["n_stages"] == 3
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"]
    assert set(plans) >= {"dataset_name", "plans_name", "transpose_forward", "configurations",
                          "foreground_intensity_properties_per_channel"}
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "fold_0", "plans.json"]
    assert folder.name == "nnUNetTrainer__nnUNetPlansSmall__2d" and folder.parent.name == "Dataset901_Tiny"


@pytest.mark.parametrize("spacing", [(0.3, 0.3), (0.25, 0.35)])
def test_preprocess_matches_default_preprocessor(tiny, spacing):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    _, plans, dataset_json, folder = tiny
    model = load_model_folder(folder)
    pm = PlansManager(plans)
    for img in _images():
        ours, props = model.preprocess(img, spacing)
        ref, _, ref_props = DefaultPreprocessor(verbose=False).run_case_npy(
            img[None, None].astype(np.float32), None, {"spacing": [max(spacing) * 999, *spacing]}, pm,
            pm.get_configuration("2d"), dataset_json)
        assert ours.shape == ref[:, 0].shape and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref[:, 0])
        assert props["bbox_used_for_cropping"] == ref_props["bbox_used_for_cropping"]
    assert abs(float(ours.mean())) < 0.05 and abs(float(ours.std()) - 1) < 0.05  # z-scored, then resampled


@pytest.mark.parametrize("mirror", [False, True])
def test_logits_and_masks_match_nnunet_predictor(tiny, mirror):
    _, _, _, folder = tiny
    model = load_model_folder(folder)
    assert model.trainer_name == "nnUNetTrainer" and model.mirror_axes == (0, 1)
    pred = _predictor(folder, mirror)
    for img in _images(2):
        data, _ = model.preprocess(img, (0.3, 0.3))
        assert data.shape[-2:] == (64, 64)  # 3x3 tiles of 32x32
        ref = pred.predict_logits_from_preprocessed_data(torch.from_numpy(data[:, None])).float()[:, 0]
        ours = model.preprocessed_logits(data, mirror=mirror).float()
        assert float((ours - ref).abs().max()) < 1e-4
        ref_mask = pred.predict_single_npy_array(img[None, None].astype(np.float32),
                                                 {"spacing": [0.3 * 999, 0.3, 0.3]})[0]
        ours_mask = model.predict(img, (0.3, 0.3), mirror=mirror)
        assert ours_mask.dtype == np.uint8 and ours_mask.shape == img.shape
        np.testing.assert_array_equal(ours_mask, ref_mask)


def test_float32_accumulation_close_to_nnunet(tiny):
    _, _, _, folder = tiny
    model = load_model_folder(folder)
    model.accumulate_dtype = torch.float32
    pred = _predictor(folder)
    img = _images(1)[0]
    data, _ = model.preprocess(img, (0.3, 0.3))
    ref = pred.predict_logits_from_preprocessed_data(torch.from_numpy(data[:, None])).float()[:, 0]
    ours = model.preprocessed_logits(data)
    assert ours.dtype == torch.float32
    assert float((ours - ref).abs().max()) < 0.05  # nnU-Net's own float16 rounding
    mask = model.predict(img, (0.3, 0.3))
    ref_mask = pred.predict_single_npy_array(img[None, None].astype(np.float32), {"spacing": [299.7, 0.3, 0.3]})[0]
    assert (mask == ref_mask).mean() > 0.995


def test_predict_logits_geometry_and_resampling(tiny):
    _, _, _, folder = tiny
    model = load_model_folder(folder)
    img = _images(1)[0]
    logits = model.predict_logits(img, (0.2, 0.25))  # resampled to the plan's 0.3 mm and back
    assert logits.shape == (4, *img.shape) and logits.dtype == np.float32
    mask = model.predict(img, (0.2, 0.25))
    assert mask.shape == img.shape
    inside = img > 0
    assert (logits.argmax(0)[inside] == mask[inside]).mean() > 0.97
    # outside the non-zero crop box: background, with background-favouring logits
    framed = np.zeros((74, 74), np.uint8)
    framed[5:69, 5:69] = np.maximum(img, 1)
    m2, l2 = model.predict(framed, (0.3, 0.3)), model.predict_logits(framed, (0.3, 0.3))
    assert (m2[:5] == 0).all() and (m2[:, -5:] == 0).all()
    assert (l2[0, :5] == 0).all() and (l2[1:, :5] < -10).all()


def test_to_patch_from_patch_round_trip(tiny):
    _, _, dataset_json, folder = tiny
    model = load_model_folder(folder)
    rng = np.random.default_rng(3)
    img, lab = synth_case(rng, 64)
    x, props = model.to_patch(img, model.spacing)
    assert tuple(x.shape) == (1, 32, 32) and x.dtype == torch.float32
    _, seg, _ = model.preprocess_pair(img, lab, model.spacing)
    from rl_adapt.policies.inference import centre_pad_crop

    seg_patch, _ = centre_pad_crop(np.maximum(seg, 0), model.patch_size)
    back = model.from_patch(seg_patch, props)
    assert back.shape == lab.shape and back.dtype == np.uint8
    # the centre 32x32 of the cropped 64x64 survives exactly; the rest is background
    rows, cols = np.nonzero(back)
    np.testing.assert_array_equal(back[back > 0], lab[back > 0])
    # logits: network on the patch, mapped back, agree with the label route
    with torch.no_grad():
        lg = model.network(x[None])[0]
    lb = model.from_patch(lg, props)
    assert lb.shape == (4, *img.shape)
    np.testing.assert_array_equal(lb.argmax(0), model.from_patch(lg.argmax(0), props))
    # a patch the same size as the preprocessed image maps back exactly
    small_img = img[16:48, 16:48].copy()
    small_lab = lab[16:48, 16:48].copy()
    small_img[small_img == 0] = 1  # no crop
    x2, props2 = model.to_patch(small_img, model.spacing)
    _, seg2, _ = model.preprocess_pair(small_img, small_lab, model.spacing)
    np.testing.assert_array_equal(model.from_patch(seg2, props2), small_lab)


def test_export_round_trip_and_source_untouched(tiny, tmp_path):
    _, _, _, folder = tiny

    def snapshot(d: Path):
        return {str(p.relative_to(d)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                for p in sorted(d.rglob("*")) if p.is_file()}

    before = snapshot(folder)
    model = load_model_folder(folder)
    net = model.network
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    out = export_model_folder(net, model, tmp_path / "adapted", extra_meta={"note": "test"})
    assert out == tmp_path / "adapted" / "Dataset901_Tiny" / "nnUNetTrainer__nnUNetPlansSmall__2d"
    again = load_model_folder(out)
    for (k, a), b in zip(net.state_dict().items(), again.network.state_dict().values()):
        assert torch.equal(a.cpu(), b), k
    ckpt = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer" and ckpt["init_args"]["configuration"] == "2d"
    assert "optimizer_state" not in ckpt and ckpt["rl_adapt"] == {"note": "test"}
    _predictor(out)  # nnU-Net loads it with the default trainer
    with pytest.raises(InputError, match="overlaps the source"):
        export_model_folder(net, model, folder.parent.parent)
    with pytest.raises(FileExistsError):
        export_model_folder(net, model, tmp_path / "adapted")
    assert snapshot(folder) == before


def test_ensemble_of_folds_averages(tiny, tmp_path):
    _, _, _, folder = tiny
    model = load_model_folder(folder)
    other = model.state_dict()
    torch.manual_seed(1)
    other = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in other.items()}
    out = export_model_folder(model.network, model, tmp_path / "ens", fold=0)
    export_model_folder(other, model, tmp_path / "ens", fold=1)
    ens = load_model_folder(out, folds=(0, 1))
    f0, f1 = load_model_folder(out, folds=(0,)), load_model_folder(out, folds=(1,))
    for m in (ens, f0, f1):
        m.accumulate_dtype = torch.float32
    img = _images(1)[0]
    data, _ = ens.preprocess(img, (0.3, 0.3))
    avg = (f0.preprocessed_logits(data) + f1.preprocessed_logits(data)) / 2
    assert len(ens.networks) == 2
    torch.testing.assert_close(ens.preprocessed_logits(data), avg, atol=1e-5, rtol=0)


def test_resolve_model_folder(tiny, tmp_path):
    _, _, _, folder = tiny
    assert resolve_model_folder(folder) == folder
    assert resolve_model_folder(folder.parent.parent) == folder
    with pytest.raises(InputError, match="not an nnU-Net results folder"):
        resolve_model_folder(tmp_path)


def test_checkpoint_saved_by_nnunet_trainer_loads(tiny, tmp_path, monkeypatch):
    """A checkpoint written by nnunetv2's own nnUNetTrainer.save_checkpoint (real trainer object)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    _, plans, dataset_json, _ = tiny
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("nnUNet_compile", "f")
    # nnUNetv2_train's run_training adds this key before building the trainer
    trainer = nnUNetTrainer(dict(plans, continue_training=False), "2d", 0, dataset_json, device=torch.device("cpu"))
    # nnU-Net's own preprocessing of the raw cases into the trainer's preprocessed folder
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw = tiny[0]
    pre_dir = Path(trainer.preprocessed_dataset_folder)
    pre_dir.mkdir(parents=True)
    pm = PlansManager(plans)
    for i in range(2):
        DefaultPreprocessor(verbose=False).run_case_save(
            str(pre_dir / f"case{i:03d}"), [str(raw / "imagesTr" / f"case{i:03d}_0000.nii.gz")],
            str(raw / "labelsTr" / f"case{i:03d}.nii.gz"), pm, pm.get_configuration("2d"), dataset_json)
    trainer.initialize()
    x = torch.randn(2, 1, 32, 32)
    y = torch.randint(0, 4, (2, 1, 32, 32))
    targets = [y, torch.nn.functional.interpolate(y.float(), scale_factor=0.5, mode="nearest").long(),
               torch.nn.functional.interpolate(y.float(), scale_factor=0.25, mode="nearest").long()]
    trainer.network.train()
    for _ in range(2):  # two real optimisation steps with nnU-Net's loss and optimizer
        trainer.optimizer.zero_grad()
        loss = trainer.loss(trainer.network(x), targets)
        loss.backward()
        trainer.optimizer.step()
    folder = Path(trainer.output_folder)
    trainer.save_checkpoint(str(folder / "checkpoint_final.pth"))
    model_dir = folder.parent
    (model_dir / "plans.json").write_text(json.dumps(plans))
    (model_dir / "dataset.json").write_text(json.dumps(dataset_json))
    assert model_dir.name == "nnUNetTrainer__nnUNetPlansSmall__2d"
    model = load_model_folder(model_dir)
    trainer.network.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), trainer.network(x)[0])
    img = _images(1)[0]
    np.testing.assert_array_equal(
        model.predict(img, (0.3, 0.3)),
        _predictor(model_dir).predict_single_npy_array(img[None, None].astype(np.float32),
                                                       {"spacing": [299.7, 0.3, 0.3]})[0])
