"""rl_adapt.styling: label-free restyling of source images toward a target scanner (spectrum + histogram).

Self-contained synthetic "echo-like" images: a fan (circular sector, apex at top centre) filled with
Rayleigh-like speckle over a bright wall and a dark cavity, black outside. The target scanner is darker and
blurrier than the source.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from rl_adapt.errors import InputError
from rl_adapt.styling import (TargetStyle, estimate_style, intensity_scale, restyle, restyle_batch,
                              sector_mask)


def fan_mask(shape, half_angle=0.6, radius=0.95):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    dx = xx - (w - 1) / 2.0
    r = np.hypot(yy, dx)
    return (r <= radius * h) & (np.abs(np.arctan2(dx, yy + 1e-9)) <= half_angle)


def echo_image(shape, seed, brightness=1.0, blur=0.0, as_float=False):
    """uint8 (or float 0..1) fan image: speckle x (wall / cavity) echogenicity, optional extra blur."""
    rng = np.random.default_rng(seed)
    h, w = shape
    inside = fan_mask(shape)
    a = ndi.gaussian_filter(rng.normal(size=shape), 0.7)
    b = ndi.gaussian_filter(rng.normal(size=shape), 0.7)
    speckle = np.hypot(a, b)
    speckle /= speckle.mean()
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    cavity = ((yy - 0.5 * h) / (0.25 * h)) ** 2 + ((xx - 0.5 * w) / (0.12 * w)) ** 2 < 1
    echo = np.where(cavity, 0.15, 0.6)
    img = 160.0 * brightness * echo * speckle
    if blur > 0:
        img = ndi.gaussian_filter(img, blur)
    img = np.clip(img, 0, 255) * inside
    img = np.where(inside, np.maximum(img, 1.0), 0.0)  # Real fans are rarely exactly 0 inside.
    if as_float:
        return (img / 255.0).astype(np.float32)
    return img.astype(np.uint8)


def sources(n, shape=(64, 64), first=0):
    return [echo_image(shape, 1000 + first + i) for i in range(n)]


def targets(n, shape=(64, 64)):
    return [echo_image(shape, 5000 + i, brightness=0.45, blur=1.3) for i in range(n)]


def hf_fraction(image):
    """Share of spectral power above 0.25 cycles/pixel of the in-sector normalised image (DC excluded)."""
    arr = np.asarray(image, dtype=float)
    m = fan_mask(arr.shape)
    z = np.where(m, (arr - arr[m].mean()) / arr[m].std(), 0.0)
    p = np.abs(np.fft.fft2(z)) ** 2
    fy = np.fft.fftfreq(arr.shape[0])[:, None]
    fx = np.fft.fftfreq(arr.shape[1])[None, :]
    p[0, 0] = 0.0
    return float(p[np.hypot(fy, fx) > 0.25].sum() / p.sum())


def in_sector_stats(image):
    arr = np.asarray(image, dtype=float)
    vals = arr[fan_mask(arr.shape)]
    return np.array([vals.mean(), *np.percentile(vals, [10, 50, 90])])


@pytest.fixture(scope="module")
def shifted_style():
    return estimate_style(sources(10), targets(10), size=64, n_quantiles=128)


def test_sector_mask_finds_the_fan_even_when_dark():
    for img in (echo_image((64, 64), 1), echo_image((64, 64), 2, brightness=0.3, blur=1.3)):
        truth = fan_mask(img.shape)
        got = sector_mask(img)
        iou = (got & truth).sum() / (got | truth).sum()
        assert iou > 0.95
    # A tiny blob is not a sector: the whole image is used.
    blob = np.zeros((40, 50), np.uint8)
    blob[5:8, 5:8] = 200
    assert sector_mask(blob).all()
    assert intensity_scale(blob) == 255.0 and intensity_scale(blob / 255.0) == 1.0


def test_restyle_moves_intensities_and_texture_toward_the_target(shifted_style):
    tgt = targets(10)
    src = sources(6, first=50)  # not used for the estimate
    out = restyle_batch(src, shifted_style, seed=3)
    s_stats = np.mean([in_sector_stats(im) for im in src], axis=0)
    r_stats = np.mean([in_sector_stats(im) for im in out], axis=0)
    t_stats = np.mean([in_sector_stats(im) for im in tgt], axis=0)
    # Mean and 10/50/90th percentiles: the remaining gap is a small part of the original one.
    assert np.all(np.abs(r_stats - t_stats) < 0.25 * np.abs(s_stats - t_stats)), (s_stats, r_stats, t_stats)
    s_hf = np.mean([hf_fraction(im) for im in src])
    r_hf = np.mean([hf_fraction(im) for im in out])
    t_hf = np.mean([hf_fraction(im) for im in tgt])
    assert t_hf < s_hf  # the target is blurrier
    assert abs(r_hf - t_hf) < 0.5 * abs(s_hf - t_hf), (s_hf, r_hf, t_hf)
    # Spectrum only (histogram=False): texture moves, in-sector mean and std stay the source's.
    spec = [restyle(im, shifted_style, 0, histogram=False) for im in src]
    assert abs(np.mean([hf_fraction(im) for im in spec]) - t_hf) < 0.5 * abs(s_hf - t_hf)
    for a, b in zip(src, spec):
        m = fan_mask(a.shape)
        assert abs(float(b[m].mean()) - float(a[m].mean())) < 0.05 * float(a[m].mean()) + 1.0
    # Half strength lies in between.
    half = np.mean([hf_fraction(restyle(im, shifted_style, 0, spectrum_strength=0.5)) for im in src])
    assert r_hf < half < s_hf


def test_identity_style_leaves_images_nearly_unchanged():
    imgs = sources(8)
    style = estimate_style(imgs, np.stack(imgs), size=64, n_quantiles=256)  # an (N, H, W) array works too
    np.testing.assert_allclose(style.amplitude_ratio((64, 64)), 1.0, atol=1e-9)
    for i, img in enumerate(imgs[:4]):
        m = fan_mask(img.shape)
        spec_only = restyle(img, style, i, histogram=False)
        assert np.max(np.abs(spec_only - img.astype(np.float32))) < 1e-3
        full = restyle(img, style, i)  # histogram matched to another image of the same distribution
        rel = np.abs(full[m] - img[m]).mean() / img[m].mean()
        assert rel < 0.05, rel


def test_pixels_outside_the_sector_are_unchanged(shifted_style):
    for img in sources(3, first=70) + [echo_image((64, 64), 7, as_float=True)]:
        out = restyle(img, shifted_style, 1)
        outside = ~sector_mask(img)
        assert outside.sum() > 0.2 * img.size
        np.testing.assert_array_equal(out[outside], img[outside].astype(np.float32))
        far = ~ndi.binary_dilation(fan_mask(img.shape), iterations=2)
        assert np.all(out[far] == 0)


def test_seeded_determinism(shifted_style):
    img = sources(1, first=80)[0]
    a = restyle(img, shifted_style, np.random.default_rng(11))
    b = restyle(img, shifted_style, np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)
    others = [restyle(img, shifted_style, np.random.default_rng(s)) for s in range(12, 20)]
    assert any(not np.array_equal(a, o) for o in others)
    batch = sources(3, first=90)
    x = restyle_batch(batch, shifted_style, seed=5)
    y = restyle_batch(batch, shifted_style, seed=5)
    z = restyle_batch(batch, shifted_style, seed=6)
    assert all(np.array_equal(p, q) for p, q in zip(x, y))
    assert any(not np.array_equal(p, q) for p, q in zip(x, z))


def test_save_load_round_trip(shifted_style, tmp_path):
    path = shifted_style.save(tmp_path / "sub" / "style.npz")
    assert path.is_file() and path.stat().st_size < 200_000
    back = TargetStyle.load(path)
    np.testing.assert_array_equal(back.target_amplitude, shifted_style.target_amplitude)
    np.testing.assert_array_equal(back.source_amplitude, shifted_style.source_amplitude)
    np.testing.assert_array_equal(back.target_quantiles, shifted_style.target_quantiles)
    assert (back.size, back.n_target, back.n_quantiles, back.n_source) == (64, 10, 128, 10)
    img = sources(1, first=95)[0]
    np.testing.assert_array_equal(restyle(img, back, 4), restyle(img, shifted_style, 4))
    with pytest.raises(InputError):
        TargetStyle.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(InputError, match="missing"):
        TargetStyle.load(bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError):
        TargetStyle.load(tmp_path / "junk.npz")


def test_odd_sizes_and_dtypes():
    src = [echo_image((97, 130), 1), echo_image((64, 64), 2), echo_image((71, 50), 3)]
    tgt = [echo_image((80, 90), 10 + i, brightness=0.5, blur=1.0) for i in range(3)]
    style = estimate_style(src, tgt, size=48, n_quantiles=64)
    assert style.target_amplitude.shape == (48, 48) and style.target_quantiles.shape == (3, 64)
    outs = restyle_batch(src, style, seed=0)
    for a, b in zip(src, outs):
        assert b.shape == a.shape and b.dtype == np.float32
        assert b.min() >= 0 and b.max() <= 255
    r = style.amplitude_ratio((97, 130))
    assert r.shape == (97, 130) and r.min() >= 0.2 - 1e-9 and r.max() <= 5 + 1e-9
    # Float 0..1 input -> float32 0..1 output, close to the uint8 result / 255.
    f = echo_image((97, 130), 1, as_float=True)
    out_f = restyle(f, style, 3)
    assert out_f.dtype == np.float32 and out_f.shape == (97, 130) and 0 <= out_f.min() and out_f.max() <= 1.0
    np.testing.assert_allclose(out_f, restyle(src[0], style, 3) / 255.0, atol=0.02)


def test_bad_input_is_refused(shifted_style):
    good = sources(2)
    with pytest.raises(InputError):
        estimate_style([], good)
    with pytest.raises(InputError):
        estimate_style(good, [])
    with pytest.raises(InputError):
        estimate_style(good + [np.zeros((8, 8, 3), np.uint8)], good)
    with pytest.raises(InputError):
        estimate_style(good, [np.zeros(10)])
    with pytest.raises(InputError):
        estimate_style(good[0], good)  # one 2D image is not a sequence of images
    with pytest.raises(InputError):
        restyle(np.zeros((0, 5)), shifted_style, 0)
    with pytest.raises(InputError):
        restyle(np.zeros((4, 4, 3)), shifted_style, 0)
    with pytest.raises(InputError):
        restyle(np.full((8, 8), np.nan), shifted_style, 0)
    with pytest.raises(InputError):
        restyle(good[0], "not a style", 0)
    with pytest.raises(InputError):
        restyle_batch([], shifted_style, seed=0)
    with pytest.raises(ValueError):
        restyle(good[0], shifted_style, 0, spectrum_strength=1.5)


def test_degrade_adds_noise_a_noisier_scanner_has_and_depth_and_angle_profiles_transfer():
    from rl_adapt.styling import beam_angles, depth_bins

    src = sources(12, (64, 64))
    rng = np.random.default_rng(5)
    mask = fan_mask((64, 64))
    noisy = []
    for i, im in enumerate(sources(12, (64, 64), first=50)):
        out = im.astype(np.float64)
        out = out * np.linspace(1.0, 0.4, 64)[:, None]  # a darker far field
        ang = beam_angles(mask)
        out[(ang > 0.45) & (ang < 0.55)] *= 0.2  # a shadow along the middle beams
        out += rng.normal(0, 25, out.shape) * mask  # electronic noise
        noisy.append(np.clip(out, 0, 255).astype(np.uint8) * mask)
    style = estimate_style(src, noisy)
    assert style.depth_gain()[-1] < style.depth_gain()[0]  # the target's far field is darker
    dips = style.target_angular.mean(0)
    assert dips[28:36].mean() < 0.7 * np.r_[dips[8:20], dips[44:56]].mean()  # the shadow is in the middle bins
    image = src[0]
    plain = restyle(image, style, 0, mode="degrade", histogram=False)
    both = restyle(image, style, 0, mode="degrade", histogram=False, depth=True, angular=True)
    m = sector_mask(image)
    assert hf_fraction(plain) > hf_fraction(restyle(image, style, 0, mode="ratio", histogram=False, spectrum_strength=0))
    rows = depth_bins(m)
    assert both[m & (rows >= 24)].mean() < both[m & (rows < 8)].mean() * plain[m & (rows >= 24)].mean() / max(
        plain[m & (rows < 8)].mean(), 1e-6)  # relatively darker far field than without the depth profile
    ang = beam_angles(m)
    centre, sides = m & (ang > 0.46) & (ang < 0.54), m & ((ang < 0.3) | (ang > 0.7))
    assert both[centre].mean() / both[sides].mean() < plain[centre].mean() / plain[sides].mean()  # the dip
    with pytest.raises(ValueError, match="mode"):
        restyle(image, style, 0, mode="bogus")


def test_degrade_noise_has_the_in_sector_variance_of_the_target():
    """The stored spectra are per sqrt(sector pixel): noise drawn from them must have the target's in-sector variance
    whatever share of the image the fan covers (it came out sqrt(sector share) too weak, ~0.73 on CAMUS fans)."""
    from rl_adapt.styling import _amplitude, _spectral_step

    rng = np.random.default_rng(0)
    for radius in (0.95, 0.6):
        mask = fan_mask((96, 96), radius=radius)
        field = np.where(mask, rng.standard_normal(mask.shape), 0.0)
        amp = _amplitude(field, mask, 96)
        style = TargetStyle(target_amplitude=amp, source_amplitude=amp * 1e-4,
                            target_quantiles=np.linspace(0, 1, 8)[None], n_source=1)
        noise = _spectral_step(np.zeros(mask.shape), mask, style, rng, 1.0, (0.2, 5.0), 0.0, "degrade")
        assert mask.mean() < 0.8 and noise[mask].std() == pytest.approx(1.0, rel=0.08)
        assert np.all(noise[~mask] == 0)


def test_beam_grid_rows_are_depths_and_columns_beam_angles():
    from rl_adapt.styling import BeamGrid, _radius_angle

    mask = fan_mask((96, 96))
    grid = BeamGrid.of(mask, 48)
    assert grid.rows.shape == (48, 96) and grid.inside.mean() > 0.9
    r, th = _radius_angle(mask)
    radial, angular = grid.sample(r), grid.sample(th)
    inner = grid.inside
    spread_r = [np.ptp(row[ok]) for row, ok in zip(radial, inner) if ok.sum() > 10]
    assert max(spread_r) < 1.5                                   # a row is one depth...
    deep = inner & (radial > 15)                                 # near the apex a pixel spans many beams
    spread_t = [np.ptp(col[ok]) for col, ok in zip(angular.T, deep.T) if ok.sum() > 10]
    assert max(spread_t) < 0.05                                  # ...a column one beam angle
    assert np.all(np.diff(radial[:, 48][inner[:, 48]]) > 0)      # depth grows down the rows
    smooth = np.where(mask, np.cos(r / 30.0) + th, 0.0)          # and the grid maps back onto the image
    back = grid.to_image(grid.sample(smooth))
    core = ndi.binary_erosion(mask, iterations=3) & (r > 10)
    assert np.abs(back - smooth)[core].max() < 0.05


def test_beam_restyling_is_seeded_needs_beam_spectra_and_round_trips_through_a_file(tmp_path):
    shifted_style = estimate_style(sources(10), targets(10), size=64, n_quantiles=128, beam=True)
    assert not estimate_style(sources(2), targets(2), size=64).has_beam  # only estimated when asked for
    img = sources(1, first=77)[0]
    out = restyle(img, shifted_style, 3, mode="degrade", beam=True)
    np.testing.assert_array_equal(out, restyle(img, shifted_style, 3, mode="degrade", beam=True))
    assert out.shape == img.shape and out.dtype == np.float32
    assert not np.array_equal(out, restyle(img, shifted_style, 3, mode="degrade"))
    m = sector_mask(img)
    np.testing.assert_array_equal(out[~m], img[~m].astype(np.float32))
    assert hf_fraction(out) < hf_fraction(img)                   # the target scanner is blurrier
    back = TargetStyle.load(shifted_style.save(tmp_path / "style.npz"))
    np.testing.assert_array_equal(back.target_beam_amplitude, shifted_style.target_beam_amplitude)
    np.testing.assert_array_equal(restyle(img, back, 3, mode="degrade", beam=True), out)
    old = TargetStyle(target_amplitude=back.target_amplitude, source_amplitude=back.source_amplitude,
                      target_quantiles=back.target_quantiles, n_source=back.n_source)  # a style saved before format 3
    with pytest.raises(InputError, match="beam-space spectra"):
        restyle(img, old, 3, mode="degrade", beam=True)


def test_histogram_bands_imitate_a_near_field_haze_that_one_whole_sector_match_cannot(tmp_path):
    """A target whose dark cavity is lifted near the apex only (additive haze): a per-band match gives the restyled
    near field the target's near-field grey levels and keeps its far field dark; one match for the whole sector
    cannot, and one band reproduces the whole-sector match."""
    from rl_adapt.styling import depth_bins

    shape = (64, 64)
    mask = fan_mask(shape)
    haze = 120.0 * np.exp(-np.arange(64) / 10.0)[:, None]  # bright at the top, gone below a third of the depth
    hazy = [np.where(mask, np.clip(im.astype(np.float64) + haze, 1, 255), 0).astype(np.uint8)
            for im in sources(10, shape, first=70)]
    src = sources(10, shape)
    banded = estimate_style(src, hazy, size=64, n_quantiles=128, histogram_bands=4)
    assert banded.target_band_quantiles.shape == (10, 4, 128) and banded.histogram_bands == 4
    image = src[0]
    m = sector_mask(image)
    near, far = m & (depth_bins(m, 4) == 0), m & (depth_bins(m, 4) == 3)
    target_near = np.mean([im[near].mean() for im in hazy])
    target_far = np.mean([im[far].mean() for im in hazy])
    per_band = restyle(image, banded, 0, spectrum_strength=0, histogram_bands=4)
    whole = restyle(image, banded, 0, spectrum_strength=0)
    assert abs(per_band[near].mean() - target_near) < 0.5 * abs(whole[near].mean() - target_near)
    assert abs(per_band[far].mean() - target_far) < 0.5 * abs(whole[far].mean() - target_far)
    assert np.array_equal(per_band[~m], image[~m].astype(np.float32))  # outside the fan: unchanged
    assert np.all(np.diff(per_band[40, m[40]][np.argsort(image[40, m[40]], kind="stable")]) >= -1e-4)  # row order kept
    assert np.array_equal(per_band, restyle(image, banded, 0, spectrum_strength=0, histogram_bands=4))  # seeded
    one = estimate_style(src, hazy, size=64, n_quantiles=128)
    assert one.target_band_quantiles is None and one.histogram_bands == 1
    with pytest.raises(InputError, match="histogram bands"):
        restyle(image, one, 0, histogram_bands=4)
    back = TargetStyle.load(banded.save(tmp_path / "style.npz"))
    assert np.array_equal(back.target_band_quantiles, banded.target_band_quantiles)
    with pytest.raises(ValueError, match="histogram_bands"):
        estimate_style(src, hazy, histogram_bands=0)
