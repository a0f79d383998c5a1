"""Reward network (negatives, training, calibration, save/load) and the numpy calibration metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from sklearn.metrics import roc_auc_score

from rl_adapt.measures.calibration import auroc, error_detection_report, expected_calibration_error, reliability_bins
from rl_adapt.config import bounds_problem
from rl_adapt.errors import InputError
from rl_adapt.engine.reward.dataset import PERTURBATIONS, build_reward_dataset, perturb_mask
from rl_adapt.engine.reward.network import (RewardNet, RewardNetConfig, border_band, fit_temperature,
                                            train_reward_net)

from phantoms import BG, LA, LV, MYO  # noqa: E402,F401
from phantoms import heart as phantom_heart  # noqa: E402
from conftest import TEST_THREADS  # noqa: E402


def heart(size: int, rng: np.random.Generator) -> np.ndarray:
    """The shared phantom with a wider position jitter."""
    return phantom_heart(size, rng, jitter=(2.0, 3.0))


def image_of(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Echo-like image: dark blood pools (LV, LA), bright myocardium, speckle-ish noise, blur."""
    lut = np.array([0.2, 0.05, 0.8, 0.1]) + rng.normal(0, 0.03, 4)
    img = lut[mask] + rng.normal(0, 0.12, mask.shape)
    return ndi.gaussian_filter(img, 0.7).astype(np.float32)


def synthetic_set(n: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    masks = np.stack([heart(size, rng) for _ in range(n)])
    images = np.stack([image_of(m, rng) for m in masks])[:, None]
    return images, masks


# ------------------------------------------------------------------------------------------- calibration
def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(5000) < 0.3
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounding makes many ties
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc(-s, y) == pytest.approx(1 - roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auroc(s, np.zeros_like(y)))


def test_ece_and_reliability_bins():
    rng = np.random.default_rng(1)
    p = rng.random(200_000)
    y = rng.random(p.size) < p                          # perfectly calibrated
    assert expected_calibration_error(p, y, 15) < 0.01
    p_const = np.full(1000, 0.9)
    y_half = np.arange(1000) % 2 == 0
    assert expected_calibration_error(p_const, y_half) == pytest.approx(0.4)
    bins = reliability_bins(np.array([0.0, 0.5, 1.0, 1.0]), np.array([0, 1, 1, 0]), n_bins=4)
    assert bins.counts.tolist() == [1, 0, 1, 2] and np.isnan(bins.accuracy[1])
    rep = error_detection_report(np.array([0.9, 0.8, 0.1, 0.2]), np.array([True, True, False, False]))
    assert rep["auroc"] == 1.0 and rep["error_rate"] == 0.5
    with pytest.raises(ValueError):
        expected_calibration_error(np.array([1.5]), np.array([1]))


def test_fit_temperature_recovers_the_scale():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 4, 30_000).astype(np.float32)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z / 2.5))).astype(np.float32)
    assert fit_temperature(z, y) == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(z, np.ones_like(y)) == 1.0


# ------------------------------------------------------------------------------------------- negatives
@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_every_perturbation_changes_the_mask_deterministically(kind):
    m = heart(48, np.random.default_rng(0))
    a = perturb_mask(m, np.random.default_rng(5), kind)
    b = perturb_mask(m, np.random.default_rng(5), kind)
    assert a.shape == m.shape and a.dtype == np.uint8 and a.max() <= 3
    assert not np.array_equal(a, m)
    np.testing.assert_array_equal(a, b)


def test_build_reward_dataset_pairs_and_targets():
    images, masks = synthetic_set(4, 32, 0)
    preds = masks.copy()
    preds[:, :4] = LV                                   # wrong top rows
    ds = build_reward_dataset(images, [preds], masks, seed=0, n_perturbed=2, n_other_image=1)
    assert len(ds) == 4 * (1 + 1 + 2 + 1)
    assert ds.kind.count("given0") == 4 and ds.kind.count("perturbed") == 8 and ds.kind.count("other_image") == 4
    t = ds.targets(np.arange(4))
    assert (t[:, :4] == (masks[:, :4] == LV)).all() and t[:, 4:].all()
    assert ds.targets(np.flatnonzero(np.array(ds.kind) == "corrected")).all()
    for i in np.flatnonzero(np.array(ds.kind) == "other_image"):
        assert ds.image_index[i] in range(4) and not ds.targets(np.array([i])).all()
    with pytest.raises(InputError):
        build_reward_dataset(images, [preds[:3]], masks)
    with pytest.raises(InputError):
        build_reward_dataset(images, [preds], masks[:, :16])


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(TEST_THREADS)
    images, masks = synthetic_set(40, 32, 0)
    rng = np.random.default_rng(1)
    preds = np.stack([perturb_mask(m, rng, "erode") if i % 2 else m for i, m in enumerate(masks)])
    ds = build_reward_dataset(images, [preds], masks, seed=0, n_perturbed=3, n_other_image=1)
    cfg = RewardNetConfig(features=8, depth=3, steps=150, batch_size=16, lr=3e-3, val_fraction=0.3)
    net, stats = train_reward_net(ds, cfg, device="cpu", seed=0)
    return net, stats, ds


def test_reward_net_detects_errors_on_held_out_images(trained):
    net, stats, _ = trained
    print("reward-net held-out stats:", stats)
    assert stats["auroc"] > 0.8, stats
    assert stats["ece_after"] <= stats["ece_before"] + 0.005, stats
    assert 0.05 <= stats["temperature"] <= 20
    # fresh images and fresh negatives, never seen in training
    images, masks = synthetic_set(16, 32, 99)
    rng = np.random.default_rng(7)
    segs = np.stack([perturb_mask(m, rng) for m in masks])
    reward = net.score_numpy(images, segs)
    rep = error_detection_report(reward, segs == masks)
    print("fresh perturbed masks:", rep)
    assert rep["auroc"] > 0.8, rep


def test_score_is_the_reward_fn(trained):
    net, _, _ = trained
    images, masks = synthetic_set(3, 32, 5)
    x = torch.from_numpy(images)
    a = torch.from_numpy(masks.astype(np.int64))
    r = net.score(x, a)
    assert r.shape == (3, 32, 32) and r.dtype == torch.float32
    assert float(r.min()) >= 0 and float(r.max()) <= 1
    torch.testing.assert_close(net.uncertainty_map(x, a), 1 - r)
    # the right mask earns more reward than a wrong one
    wrong = torch.from_numpy(np.stack([perturb_mask(m, np.random.default_rng(0), "shift") for m in masks]).astype(np.int64))
    assert float(net.score(x, wrong).mean()) < float(r.mean())
    # odd sizes work (internal padding)
    assert net.score(x[..., :30, :29], a[..., :30, :29]).shape == (3, 30, 29)


def test_save_load_and_refine(trained, tmp_path):
    net, _, ds = trained
    path = tmp_path / "reward_net.pt"
    net.save(path)
    loaded = RewardNet.load(path)
    assert loaded.temperature == net.temperature and loaded.stats == net.stats
    x = torch.from_numpy(ds.images[:2])
    a = torch.from_numpy(ds.segs[:2].astype(np.int64))
    torch.testing.assert_close(loaded.score(x, a), net.score(x, a))
    cfg = RewardNetConfig(features=8, depth=3, steps=5, batch_size=4)
    refined, stats = train_reward_net(ds, cfg, init=loaded, seed=1)
    assert stats["steps"] == 5 and np.isfinite(stats["train_loss"])
    with pytest.raises(InputError, match="architecture"):
        train_reward_net(ds, RewardNetConfig(features=4, steps=1), init=loaded)
    with pytest.raises(InputError, match="not found"):
        RewardNet.load(tmp_path / "nope.pt")


@pytest.mark.parametrize("steps", [1, 2, 10, 20])
def test_any_step_count_trains(trained, steps):
    """OneCycleLR divided by zero at 10 steps (a one-step warm-up); every small budget must train."""
    _, _, ds = trained
    _, stats = train_reward_net(ds, RewardNetConfig(features=4, depth=2, steps=steps, batch_size=2), seed=0)
    assert stats["steps"] == steps and np.isfinite(stats["train_loss"])


def test_border_band_marks_pixels_near_a_label_change():
    seg = torch.zeros(1, 9, 9, dtype=torch.long)
    seg[0, 3:6, 3:6] = 2
    band = border_band(seg, 1, 4)[0]
    ring = torch.zeros(9, 9, dtype=torch.bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False  # both sides of the edge within 1 px; not the square's centre, nothing farther out
    assert torch.equal(band, ring)
    assert not border_band(torch.zeros(2, 5, 5, dtype=torch.long), 2, 4).any()  # one label: no border


def test_border_weight_changes_training_and_stays_seeded(trained):
    """The band weighting reaches the loss (other weights than the unweighted run), deterministically per seed."""
    _, _, ds = trained
    cfg = dict(features=4, depth=2, steps=6, batch_size=2, calibrate=False)
    plain, _ = train_reward_net(ds, RewardNetConfig(**cfg), seed=0)
    weighted, s1 = train_reward_net(ds, RewardNetConfig(**cfg, border_weight=5.0, border_px=2), seed=0)
    again, s2 = train_reward_net(ds, RewardNetConfig(**cfg, border_weight=5.0, border_px=2), seed=0)
    w_plain = torch.cat([p.flatten() for p in plain.network.parameters()])
    w_band = torch.cat([p.flatten() for p in weighted.network.parameters()])
    w_again = torch.cat([p.flatten() for p in again.network.parameters()])
    assert not torch.equal(w_plain, w_band) and torch.equal(w_band, w_again)
    assert s1["train_loss"] == s2["train_loss"]
    assert "border_weight" in bounds_problem(RewardNetConfig(border_weight=-1.0))
