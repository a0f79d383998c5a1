"""Shape prior: trained a few seconds on synthetic hearts, it repairs blobs and holes; save/load round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rl_adapt.measures.metrics import mean_dice
from rl_adapt.errors import InputError
from rl_adapt.engine.shape_prior import ShapePrior, ShapePriorConfig, train_shape_prior

from phantoms import BG, LA, LV, MYO, heart  # noqa: E402,F401
from conftest import TEST_THREADS  # noqa: E402




def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.fixture(scope="module")
def prior() -> ShapePrior:
    torch.set_num_threads(TEST_THREADS)
    rng = np.random.default_rng(0)
    masks = np.stack([heart(64, rng) for _ in range(48)])
    cfg = ShapePriorConfig(size=32, features=8, latent_dim=32, steps=250, batch_size=16, lr=5e-3, seed=0)
    return train_shape_prior(masks, cfg, device="cpu")


def test_projection_repairs_blobs_and_holes(prior):
    rng = np.random.default_rng(1)
    clean = np.stack([heart(64, rng) for _ in range(8)])
    bad = clean.copy()
    for m in bad:
        cy, cx = np.argwhere(m == LV).mean(0)
        m[_disk(m.shape, cy, cx, 5)] = BG                   # a big hole in the cavity
        m[_disk(m.shape, 10, 52, 5)] = LA                   # a stray LA blob near the corner
    proj = prior.project(bad)
    assert proj.shape == bad.shape and proj.dtype == np.uint8
    d_bad = np.mean([mean_dice(b, c) for b, c in zip(bad, clean)])
    d_proj = np.mean([mean_dice(p, c) for p, c in zip(proj, clean)])
    assert d_proj > d_bad + 0.02, (d_bad, d_proj)
    assert (proj[:, 5:15, 47:57] == LA).mean() < 0.05          # the blob is gone
    assert prior.stats["reconstruction_pixel_accuracy"] > 0.9


def test_save_load_round_trip(prior, tmp_path):
    rng = np.random.default_rng(2)
    masks = np.stack([heart(48, rng) for _ in range(3)])  # another resolution than training
    path = tmp_path / "prior.pt"
    prior.save(path)
    loaded = ShapePrior.load(path)
    assert loaded.config == prior.config
    np.testing.assert_array_equal(loaded.project(masks), prior.project(masks))
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_bad_input(prior, tmp_path):
    with pytest.raises(InputError):
        prior.project(np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError):
        train_shape_prior(np.full((2, 16, 16), 9, np.uint8), ShapePriorConfig(steps=1))
    with pytest.raises(InputError, match="not found"):
        ShapePrior.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something else"}, bad)
    with pytest.raises(InputError, match="not a shape prior"):
        ShapePrior.load(bad)
