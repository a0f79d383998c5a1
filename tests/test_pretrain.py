"""Pretraining: loss and augmentation maths, a tiny seeded run through the CLI (deterministic), the written
folder loaded by nnUNetPredictor with the same masks as ``rl-adapt predict``. The full CPU run is ``slow``."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from rl_adapt.cli import main
from rl_adapt.training.pretrain import (AugmentConfig, augment, deep_supervision_weights, dice_per_structure,
                                        soft_dice_loss, split_cases, training_loss)

from conftest import TEST_THREADS  # noqa: E402

LABELS = {"background": 0, "LV": 1, "MYO": 2, "LA": 3}


def _case(rng, size=48):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.normal(0, 1.5), size * 0.4 + rng.normal(0, 1.5)
    a, b, t = size * 0.15, size * 0.25, 3.0
    lab = np.zeros((size, size), np.uint8)
    epi = ((xx - cx) / (a + t)) ** 2 + ((yy - cy) / (b + t)) ** 2 <= 1
    lab[epi] = 2
    lab[((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1] = 1
    lab[(((xx - cx) / a) ** 2 + ((yy - cy - b - t - 4) / 4.5) ** 2 <= 1) & ~epi] = 3
    img = np.array([0.3, 0.05, 0.8, 0.1])[lab] + 0.1 * gaussian_filter(rng.normal(size=lab.shape), 1)
    return (np.clip(img, 0.01, 1) * 255).astype(np.uint8), lab


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "Dataset903_PT"
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        img, lab = _case(rng)
        for arr, p in ((img, out / "imagesTr" / f"patient{i:04d}_4CH_ED_0000.nii.gz"),
                       (lab, out / "labelsTr" / f"patient{i:04d}_4CH_ED.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((0.3, 0.3))
            sitk.WriteImage(im, str(p))
    (out / "dataset.json").write_text(json.dumps({"channel_names": {"0": "US"}, "labels": LABELS, "numTraining": 8,
                                                  "file_ending": ".nii.gz"}))
    return out


TINY = ["--set", "plan.features=[4, 8, 16]", "--set", "plan.patch_size=[32, 32]", "--set", "plan.batch_size=4",
        "--set", "train.epochs=2", "--set", "train.iterations_per_epoch=2", "--set", "train.val_every=1",
        "--set", "train.device=cpu", "--set", f"train.num_threads={TEST_THREADS}", "--val-fraction", "0.25", "--no-progress"]


def test_soft_dice_and_loss():
    y = torch.randint(0, 4, (2, 16, 16))
    perfect = torch.nn.functional.one_hot(y, 4).permute(0, 3, 1, 2).float() * 50
    assert float(soft_dice_loss(perfect, y, batch_dice=True)) == pytest.approx(-1.0, abs=1e-4)
    assert float(training_loss(perfect, y, True)) == pytest.approx(-1.0, abs=1e-3)
    ds = [perfect, perfect[..., ::2, ::2], perfect[..., ::4, ::4]]
    assert float(training_loss(ds, y, False)) == pytest.approx(-1.0, abs=1e-3)
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    d = dice_per_structure(np.array([[1, 2], [0, 0]]), np.array([[1, 0], [0, 0]]))
    assert d == {"LV": 1.0, "MYO": 0.0, "LA": 1.0}


def test_augment_is_seeded_label_preserving_and_identity_when_off():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 32)
    y = torch.randint(0, 4, (4, 32, 32))
    a1 = augment(x, y, AugmentConfig(), torch.Generator().manual_seed(3))
    a2 = augment(x, y, AugmentConfig(), torch.Generator().manual_seed(3))
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1])
    assert a1[0].shape == x.shape and a1[1].shape == y.shape and a1[1].dtype == torch.int64
    assert set(a1[1].unique().tolist()) <= {0, 1, 2, 3}
    off = AugmentConfig(p_affine=0, p_gamma=0, p_brightness=0, p_contrast=0, p_noise=0, p_blur=0)
    xo, yo = augment(x, y, off, g)
    assert torch.equal(xo, x) and torch.equal(yo, y)
    # a pure rotation keeps the label layout recognisable (no flip): most pixels unchanged at small angles
    small = AugmentConfig(p_affine=1, rotation_deg=2, scale=[1.0, 1.0], translate=0.0, p_gamma=0, p_brightness=0,
                          p_contrast=0, p_noise=0, p_blur=0)
    blob = torch.zeros(1, 32, 32, dtype=torch.int64)
    blob[:, 4:12, 20:28] = 1
    _, yr = augment(torch.zeros(1, 1, 32, 32), blob, small, g)
    assert (yr == blob).float().mean() > 0.95


def test_split_by_patient():
    class C:
        def __init__(self, name, patient):
            self.name, self.meta = name, {"patient": patient}

    cases = [C(f"p{i}_{v}", f"p{i}") for i in range(10) for v in ("a", "b")]
    tr, va = split_cases(cases, 0.2, seed=0)
    assert len(va) == 4 and len(tr) == 16
    assert not {c.meta["patient"] for c in tr} & {c.meta["patient"] for c in va}


def _weights(folder: Path) -> dict:
    return torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]


def test_tiny_pretrain_cli_deterministic_and_nnunet_loadable(raw, tmp_path, capsys):
    assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "m1"), *TINY]) == 0
    out = capsys.readouterr().out
    assert "held-out Dice" in out
    folder = tmp_path / "m1" / "Dataset903_PT" / "nnUNetTrainer__nnUNetPlansSmall__2d"
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"plans.json", "dataset.json", "dataset_fingerprint.json", "fold_0/checkpoint_final.pth",
            "fold_0/pretrain_summary.json", "fold_0/pretrain_config.yaml"} <= names
    assert any(n.startswith("fold_0/tensorboard/events.out.tfevents") for n in names)
    summary = json.loads((folder / "fold_0" / "pretrain_summary.json").read_text())
    assert set(summary["dice_heldout"]) == {"LV", "MYO", "LA", "mean"} and summary["n_val"] == 2
    # same seed -> identical weights (CPU)
    assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "m2"), *TINY]) == 0
    w1, w2 = _weights(folder), _weights(tmp_path / "m2" / folder.relative_to(tmp_path / "m1"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # existing output fold: refused before training, nothing changed
    capsys.readouterr()
    assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "m1"), *TINY]) == 2
    assert "already exists" in capsys.readouterr().err

    # rl-adapt predict == nnU-Net's own predictor on the written folder
    assert main(["predict", "--model", str(tmp_path / "m1"), "--images", str(raw / "imagesTr"),
                 "--out", str(tmp_path / "pred"), "--no-progress"]) == 0
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(folder), (0,))
    for f in sorted((raw / "imagesTr").iterdir())[:4]:
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(f))).astype(np.float32)
        ref = pred.predict_single_npy_array(img[None, None], {"spacing": [0.3 * 999, 0.3, 0.3]})[0]
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / f.name.replace("_0000", ""))))
        np.testing.assert_array_equal(ours, ref)

    # a postprocessing.json in the model folder is applied to every mask (as nnUNetv2_apply_postprocessing would)
    from rl_adapt.postprocessing import Postprocessing, postprocessing_files

    rule = Postprocessing([("anatomical_cleanup", {"rim_px": 3})])
    (folder / "postprocessing.json").write_text(json.dumps(postprocessing_files(rule)["postprocessing.json"]))
    assert main(["predict", "--model", str(folder), "--images", str(raw / "imagesTr"),
                 "--out", str(tmp_path / "pred_pp"), "--no-progress"]) == 0
    assert main(["predict", "--model", str(folder), "--images", str(raw / "imagesTr"),
                 "--out", str(tmp_path / "pred_raw"), "--no-progress", "--postprocessing", "none"]) == 0
    for f in sorted((tmp_path / "pred").iterdir())[:4]:
        raw_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred_raw" / f.name))),
                                      raw_mask)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred_pp" / f.name))),
                                      rule(raw_mask))


def _killed_at_validation(monkeypatch, call: int) -> None:
    """Make the ``call``-th held-out evaluation (one per epoch with ``val_every=1``) raise KeyboardInterrupt, as
    Ctrl-C or a scheduler's signal would mid-run."""
    import rl_adapt.training.pretrain as pt

    real, calls = pt.evaluate_dice, []

    def evaluate(*a, **k):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pt, "evaluate_dice", evaluate)


def test_a_killed_pretraining_resumes_to_the_weights_of_an_uninterrupted_run(raw, tmp_path, capsys, monkeypatch):
    args = [*TINY, "--set", "train.epochs=3"]
    folder = Path("Dataset903_PT") / "nnUNetTrainer__nnUNetPlansSmall__2d"
    unfinished = tmp_path / "m" / "unfinished_pretrain" / "Dataset903_PT__nnUNetTrainer__nnUNetPlansSmall__2d__fold_0"
    assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "ref"), *args]) == 0

    # killed in epoch 2, after epoch 1's checkpoint: no model folder, the checkpoint holds epoch 1
    with monkeypatch.context() as m:
        _killed_at_validation(m, call=2)
        assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "m"), *args]) == 130
    assert not (tmp_path / "m" / folder).exists()
    assert torch.load(unfinished / "checkpoint.pt", weights_only=False)["epochs_done"] == 1
    capsys.readouterr()
    # the same command without --resume is refused, and so is a resume with another setting (named)
    assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "m"), *args]) == 2
    err = capsys.readouterr().err
    assert str(unfinished) in err and "1 of 3 epochs done" in err and "--resume" in err
    assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "m"), *args, "--set", "train.lr=0.01",
                 "--resume"]) == 2
    assert "train.lr: 0.003 then, 0.01 now" in capsys.readouterr().err
    assert torch.load(unfinished / "checkpoint.pt", weights_only=False)["epochs_done"] == 1  # untouched

    # resumed: the weights and held-out Dice of the uninterrupted run; the unfinished folder is gone
    assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "m"), *args, "--resume"]) == 0
    w_ref, w = _weights(tmp_path / "ref" / folder), _weights(tmp_path / "m" / folder)
    assert w_ref.keys() == w.keys() and all(torch.equal(w_ref[k], w[k]) for k in w_ref)
    ref = json.loads((tmp_path / "ref" / folder / "fold_0" / "pretrain_summary.json").read_text())
    got = json.loads((tmp_path / "m" / folder / "fold_0" / "pretrain_summary.json").read_text())
    assert [h["epoch"] for h in got["history"]] == [1, 2, 3]
    assert [h["loss"] for h in got["history"]] == [h["loss"] for h in ref["history"]]
    assert got["dice_heldout"] == ref["dice_heldout"]
    assert not (tmp_path / "m" / "unfinished_pretrain").exists()
    events = list((tmp_path / "m" / folder / "fold_0" / "tensorboard").glob("events.out.tfevents*"))
    assert len(events) == 2  # the killed process's and the resumed one's, read together by TensorBoard

    # --resume once more (a requeued job): the finished run's result, nothing trained or written; with another
    # setting: refused, the key named
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "m").rglob("*")}
    capsys.readouterr()
    assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "m"), *args, "--set", "train.num_threads=2",
                 "--resume"]) == 0  # where it runs may differ
    out = capsys.readouterr().out
    assert str(tmp_path / "m" / folder) in out and f"mean {got['dice_heldout']['mean']:.3f}" in out
    assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "m"), *args, "--set", "train.lr=0.01",
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert "finished with other settings" in err and "train.lr: 0.003 then, 0.01 now" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "m").rglob("*")} == stamp


def test_a_pretraining_that_fails_before_its_first_checkpoint_leaves_nothing(raw, tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as m:
        _killed_at_validation(m, call=1)
        assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "m"), *TINY]) == 130
    assert not (tmp_path / "m").exists()
    # an existing results root is kept (only what the run made goes)
    (tmp_path / "root").mkdir()
    with monkeypatch.context() as m:
        _killed_at_validation(m, call=1)
        assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "root"), *TINY, "--resume"]) == 130
    assert (tmp_path / "root").is_dir() and not any((tmp_path / "root").iterdir())


@pytest.mark.slow
def test_cpu_pretrain_on_synthetic_source_reaches_dice(tmp_path):
    """The documented CPU run: synthetic source (60 patients), configs/pretrain_cpu.yaml, < 10 min, Dice >= 0.85."""
    torch.set_num_threads(2)
    data = tmp_path / "synth"
    assert main(["synth", "--domain", "source", "--patients", "60", "--out", str(data), "--format", "nnunet"]) == 0
    cfg = Path(__file__).resolve().parents[1] / "configs" / "pretrain_cpu.yaml"
    t0 = time.time()
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "M"), "--config", str(cfg), "--no-progress"]) == 0
    elapsed = time.time() - t0
    summary = json.loads(next((tmp_path / "M").rglob("pretrain_summary.json")).read_text())
    assert summary["dice_heldout"]["mean"] >= 0.85, summary["dice_heldout"]
    assert elapsed < 600, elapsed


def test_a_resume_may_change_where_it_runs_but_not_what_it_trains(tmp_path):
    from rl_adapt.errors import RLAdaptError
    from rl_adapt.training.pretrain_resume import PretrainCheckpoint, open_unfinished, save_checkpoint

    def settings(**train):
        return {"config": {"train": {"epochs": 4, "lr": 0.003, "device": "cpu", "num_threads": 1,
                                     "checkpoint_every": 1, **train}}, "data": "/d", "processes": 1}

    folder = tmp_path / "u"
    assert open_unfinished(folder, settings(), resume=True) is None  # nothing to resume: a new run
    ckpt = PretrainCheckpoint(2, {"w": torch.ones(2)}, {}, torch.Generator().get_state(), torch.get_rng_state())
    save_checkpoint(folder, ckpt, settings())
    moved = settings(device="cuda", num_threads=8, checkpoint_every=5)
    before = json.dumps(moved, sort_keys=True)
    got = open_unfinished(folder, moved, resume=True)
    assert got.epochs_done == 2 and torch.equal(got.network["w"], torch.ones(2))
    assert json.dumps(moved, sort_keys=True) == before  # the caller's settings are not changed by the comparison
    with pytest.raises(RLAdaptError, match="train.epochs: 4 then, 5 now"):
        open_unfinished(folder, settings(epochs=5), resume=True)
    from rl_adapt.errors import InputError
    with pytest.raises(InputError, match="2 of 4 epochs done"):
        open_unfinished(folder, settings(), resume=False)
    (folder / "checkpoint.pt").write_bytes(b"torn")  # e.g. a disk that filled up under another writer
    with pytest.raises(InputError, match="unreadable pretraining checkpoint"):
        open_unfinished(folder, settings(), resume=True)
