"""Input harmonization: a target scanner's images mapped toward the source's look, stored, read back, applied."""
from __future__ import annotations

import numpy as np
import pytest

from rl_adapt.errors import InputError
from rl_adapt.harmonize import Harmonizer, HarmonizeConfig, fit_harmonizer
from rl_adapt.styling import sector_mask
from rl_adapt.synth.domains import generate_domain

PROBS = np.linspace(0.0, 1.0, 33)


@pytest.fixture(scope="module")
def scanners() -> dict:
    """Source and low-gain target images of other patients (64 x 64, synthetic B-mode)."""
    return {"source": [c.image for c in generate_domain("source", 3, seed=0, size=64)],
            "target": [c.image for c in generate_domain("target-lowgain", 3, seed=5, size=64)],
            "held_out": [c.image for c in generate_domain("target-lowgain", 2, seed=9, size=64)]}


def _quantiles(images) -> np.ndarray:
    """(len(PROBS),) mean in-sector quantile function of ``images`` (0..255)."""
    return np.mean([np.quantile(np.asarray(im, np.float64)[sector_mask(im)], PROBS) for im in images], axis=0)


def _depth_profile(images, bins: int = 8) -> np.ndarray:
    """(bins,) mean in-sector intensity per band of rows, averaged over ``images``."""
    out = []
    for im in images:
        im = np.asarray(im, np.float64)
        mask = sector_mask(im)
        rows = np.array_split(np.flatnonzero(mask.any(axis=1)), bins)
        out.append([im[r][mask[r]].mean() for r in rows])
    return np.mean(out, axis=0)


def test_harmonized_target_images_look_like_the_source_in_histogram_and_depth(scanners):
    h = fit_harmonizer(scanners["source"], scanners["target"])
    mapped = [h.apply(im) for im in scanners["held_out"]]  # images the fit never saw
    src_q, src_d = _quantiles(scanners["source"]), _depth_profile(scanners["source"])
    before = np.abs(_quantiles(scanners["held_out"]) - src_q).mean()
    after = np.abs(_quantiles(mapped) - src_q).mean()
    assert after < before / 3, (before, after)
    assert np.abs(_depth_profile(mapped) - src_d).mean() < np.abs(_depth_profile(scanners["held_out"]) - src_d).mean()
    for im, out in zip(scanners["held_out"], mapped):
        assert out.shape == im.shape and out.dtype == np.float32 and np.isfinite(out).all()
        outside = ~sector_mask(im)
        np.testing.assert_array_equal(out[outside], im[outside].astype(np.float32))  # only the fan changes


def test_the_map_is_deterministic_and_survives_save_and_load(scanners, tmp_path):
    cfg = HarmonizeConfig(max_images=6)
    h = fit_harmonizer(scanners["source"], scanners["target"], cfg)
    again = fit_harmonizer(scanners["source"], scanners["target"], cfg)
    im = scanners["held_out"][0]
    np.testing.assert_array_equal(h.apply(im), again.apply(im))
    path = h.save(tmp_path / "harmonization.npz")
    back = Harmonizer.load(path)
    np.testing.assert_array_equal(back.apply(im), h.apply(im))
    assert back.apply(im[None]).shape == (1, *im.shape)
    off = Harmonizer.load(fit_harmonizer(scanners["source"], scanners["target"],
                                         HarmonizeConfig(spectrum=False, depth=False)).save(tmp_path / "off.npz"))
    assert (off.spectrum, off.depth, off.histogram) == (False, False, True)
    assert not np.array_equal(off.apply(im), h.apply(im))


def test_a_bad_map_file_is_one_error_naming_it(scanners, tmp_path):
    junk = tmp_path / "harmonization.npz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(InputError, match="harmonization.npz.*cannot read"):
        Harmonizer.load(junk)
    partial = tmp_path / "partial.npz"
    np.savez(partial, source_quantiles=np.linspace(0, 1, 8))
    with pytest.raises(InputError, match="partial.npz.*missing"):
        Harmonizer.load(partial)
    good = fit_harmonizer(scanners["source"], scanners["target"]).save(tmp_path / "good.npz")
    with np.load(good) as z:
        arrays = dict(z)
    arrays["source_amplitude"] = arrays["source_amplitude"][:4]  # spectra of two different sizes
    np.savez(tmp_path / "inconsistent.npz", **arrays)
    with pytest.raises(InputError, match="inconsistent.npz.*spectra"):
        Harmonizer.load(tmp_path / "inconsistent.npz")
    with pytest.raises(InputError, match="not found"):
        Harmonizer.load(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="max_images"):
        HarmonizeConfig(max_images=-1)
    with pytest.raises(ValueError, match="harmonize.when"):
        HarmonizeConfig(when="sometimes")
