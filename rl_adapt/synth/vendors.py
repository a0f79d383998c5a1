"""Scanner ("vendor") presets and the B-mode rendering chain of the synthetic echo generator.

Rendering of one view (:func:`render_view`), in the scanner's polar (depth r, beam angle theta) grid:

1. echogenicity map from the shape model (:mod:`rl_adapt.synth.shapes`): blood pool dark, myocardium
   bright with texture, pericardium brightest, chest wall layers in the near field, background tissue
   with a slowly varying texture;
2. speckle: complex Gaussian scatterers weighted by the echogenicity, filtered by a Gaussian point-spread
   function (axial sigma in mm, lateral sigma in degrees, so lateral speckle grows with depth), envelope
   = magnitude (Rayleigh statistics in uniform regions);
3. optional wall dropout, depth attenuation (two-way, dB/cm) partly compensated by time-gain control,
   electronic noise added before the TGC (so it grows with depth), near-field clutter haze with
   reverberation bands, acoustic shadows (dark stripes along beam lines from a rib or calcification);
4. log compression to the preset's dynamic range and gain, scan conversion to a (size x size) Cartesian
   grid whose rows cover the sector depth and whose columns cover the sector width (spacing
   ``depth/size`` x ``2 depth sin(angle/2)/size`` mm), black outside the fan, optional low-resolution
   rendering and post-blur; uint8 output.

:func:`apply_vendor_shift` applies a target preset's look to any image (including real CAMUS uint8
images): it inverts the source preset's log compression, warps to the target sector geometry (labels
follow with nearest-neighbour), re-blurs to the target resolution, imposes the target speckle,
attenuation difference, noise, clutter, shadows and dropout, and re-compresses with the target settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from rl_adapt.errors import InputError


@dataclass(frozen=True)
class VendorPreset:
    """The acquisition and display settings that make one scanner's images look the way they do."""

    name: str
    """Domain name ("source", "target-...")."""
    description: str = ""
    """What a clinician would notice about these images."""
    depth_mm: float = 150.0
    """Sector depth (radius of the fan); sets the row spacing ``depth_mm / size``."""
    sector_deg: float = 75.0
    """Full opening angle of the fan."""
    psf_axial_mm: float = 0.9
    """Axial sigma of the point-spread function: speckle length along the beam and edge blur."""
    psf_lateral_deg: float = 0.9
    """Lateral sigma of the point-spread function in degrees (speckle width grows with depth)."""
    attenuation_db_cm: float = 1.2
    """Two-way tissue attenuation, dB per cm of depth."""
    tgc_compensation: float = 0.85
    """Fraction of the attenuation the time-gain control gives back (1 = flat brightness with depth)."""
    gain_db: float = 0.0
    """Overall receive gain; raises every pixel by ``gain_db / dynamic_range_db`` of the grey range."""
    dynamic_range_db: float = 48.0
    """Range of echo levels mapped onto 0..255 by the log compression (narrow = contrasty, clipped)."""
    noise_level: float = 0.004
    """Electronic noise amplitude relative to bright tissue, added before the TGC."""
    blood_echo: float = 0.008
    """Echogenicity of blood relative to bright tissue (smoke / cavity noise when higher)."""
    tissue_echo: float = 0.22
    """Mean echogenicity of background tissue around the heart."""
    myo_echo: float = 0.8
    """Mean echogenicity of the myocardium."""
    clutter_strength: float = 0.0
    """Amplitude of the near-field haze relative to bright tissue (0 = none)."""
    clutter_depth_mm: float = 25.0
    """Depth over which the near-field haze decays (1/e)."""
    shadow_count: tuple[int, int] = (0, 0)
    """(min, max) number of acoustic shadows per image."""
    shadow_strength: float = 0.0
    """Fraction of the signal removed in a shadow's core (0..1)."""
    shadow_width_deg: float = 5.0
    """Typical angular width of a shadow (sigma of its Gaussian profile)."""
    dropout_prob: float = 0.0
    """Probability that a segment of the (lateral or septal) wall drops out in an image."""
    dropout_strength: float = 0.0
    """Fraction of the signal lost in a dropout segment."""
    post_blur_px: float = 0.0
    """Gaussian blur (pixels) applied after scan conversion (display smoothing / low resolution)."""
    render_scale: float = 1.0
    """Render at ``render_scale * size`` and resize back up (< 1 = coarser acquisition grid)."""


VENDORS: dict[str, VendorPreset] = {
    p.name: p for p in (
        VendorPreset(
            name="source",
            description="Well-tuned scanner: clean contrast, fine speckle, full TGC, 75 deg sector, 150 mm depth.",
        ),
        VendorPreset(
            name="target-lowgain",
            description="Under-gained, narrow dynamic range, strong attenuation with weak TGC (dark far field), "
                        "fine but noisy speckle, noisy blood pool.",
            gain_db=-5.0, dynamic_range_db=34.0, attenuation_db_cm=2.0, tgc_compensation=0.55,
            psf_axial_mm=0.55, psf_lateral_deg=0.6, noise_level=0.02, blood_echo=0.04,
        ),
        VendorPreset(
            name="target-blur",
            description="Low resolution (coarse grid, wide PSF): large blurry speckle, soft borders, and a "
                        "bright near-field clutter haze filling the apex.",
            psf_axial_mm=1.6, psf_lateral_deg=1.9, render_scale=0.6, post_blur_px=0.8,
            clutter_strength=0.3, clutter_depth_mm=30.0, blood_echo=0.02, dynamic_range_db=52.0,
        ),
        VendorPreset(
            name="target-shadow",
            description="Wide 90 deg sector imaged deep (180 mm: smaller heart, coarser spacing), rib shadows "
                        "and wall dropout across the myocardium.",
            depth_mm=180.0, sector_deg=90.0, shadow_count=(1, 3), shadow_strength=0.85, shadow_width_deg=4.0,
            dropout_prob=0.8, dropout_strength=0.85, psf_lateral_deg=1.2, tissue_echo=0.4,
        ),
    )
}
"""Built-in domains: ``source`` and the ``target-*`` scanners (each a different mix of shifts)."""


def get_preset(name: str) -> VendorPreset:
    """The preset called ``name``; :class:`InputError` listing the valid names otherwise."""
    try:
        return VENDORS[name]
    except KeyError:
        raise InputError(None, f"unknown domain {name!r}; valid domains: {', '.join(VENDORS)}") from None


# -------------------------------------------------------------------------------------------- geometry
@dataclass
class FanGrid:
    """Cartesian pixel centres of a (H, W) image covering a sector of ``depth`` mm and ``half`` rad."""

    depth: float
    half: float
    shape: tuple[int, int]
    spacing: tuple[float, float] = field(init=False)
    x: np.ndarray = field(init=False, repr=False)
    z: np.ndarray = field(init=False, repr=False)
    r: np.ndarray = field(init=False, repr=False)
    th: np.ndarray = field(init=False, repr=False)
    inside: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        H, W = self.shape
        self.spacing = (self.depth / H, 2.0 * self.depth * np.sin(self.half) / W)
        zz = (np.arange(H) + 0.5) * self.spacing[0]
        xx = (np.arange(W) + 0.5 - W / 2.0) * self.spacing[1]
        self.z, self.x = np.meshgrid(zz, xx, indexing="ij")
        self.r = np.hypot(self.x, self.z)
        self.th = np.arctan2(self.x, self.z)
        self.inside = (self.r <= self.depth) & (np.abs(self.th) <= self.half)


def fan_grid(preset: VendorPreset, shape: tuple[int, int]) -> FanGrid:
    """The Cartesian image grid of ``preset`` at ``shape`` (spacing in mm as (row, col))."""
    return FanGrid(preset.depth_mm, float(np.deg2rad(preset.sector_deg / 2.0)), tuple(shape))


def polar_grid(preset: VendorPreset, n_r: int, n_t: int) -> tuple[np.ndarray, np.ndarray]:
    """(r mm, theta rad) arrays of shape (n_r, n_t) sampling the sector at cell centres."""
    half = np.deg2rad(preset.sector_deg / 2.0)
    r = (np.arange(n_r) + 0.5) * preset.depth_mm / n_r
    t = -half + (np.arange(n_t) + 0.5) * 2 * half / n_t
    return np.meshgrid(r, t, indexing="ij")


def polar_to_cart(polar: np.ndarray, preset: VendorPreset, grid: FanGrid, order: int = 1) -> np.ndarray:
    """Scan conversion: sample a (n_r, n_t) polar image at the grid's pixels; 0 outside the fan."""
    n_r, n_t = polar.shape
    half = np.deg2rad(preset.sector_deg / 2.0)
    kr = grid.r / preset.depth_mm * n_r - 0.5
    kt = (grid.th + half) / (2 * half) * n_t - 0.5
    out = ndi.map_coordinates(polar, [kr, kt], order=order, mode="nearest")
    out[~grid.inside] = 0
    return out


# ------------------------------------------------------------------------------------------- effects
def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation ``sigma`` (pixels)."""
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() + 1e-12)


def speckle_field(rng: np.random.Generator, amplitude: np.ndarray, sigma: tuple[float, float]) -> np.ndarray:
    """Envelope of ``amplitude``-weighted complex scatterers blurred by a Gaussian PSF (``sigma`` px).

    Normalised so that a uniform ``amplitude`` of 1 gives a Rayleigh envelope of unit RMS.
    """
    sig = (max(sigma[0], 0.35), max(sigma[1], 0.35))
    re = ndi.gaussian_filter(amplitude * rng.standard_normal(amplitude.shape), sig, mode="nearest")
    im = ndi.gaussian_filter(amplitude * rng.standard_normal(amplitude.shape), sig, mode="nearest")
    norm = np.sqrt(4 * np.pi * sig[0] * sig[1]) / np.sqrt(2.0)
    return np.hypot(re, im) * norm


def psf_sigma_px(preset: VendorPreset, n_r: int, n_t: int) -> tuple[float, float]:
    """The preset's PSF sigma in polar-grid pixels (axial, lateral)."""
    return (preset.psf_axial_mm / (preset.depth_mm / n_r), preset.psf_lateral_deg / (preset.sector_deg / n_t))


def net_attenuation_db(preset: VendorPreset, r_mm: np.ndarray) -> np.ndarray:
    """Brightness lost with depth after TGC, in dB (positive = darker)."""
    return (1.0 - preset.tgc_compensation) * preset.attenuation_db_cm * r_mm / 10.0


def shadow_gain(rng: np.random.Generator, preset: VendorPreset, r: np.ndarray, th: np.ndarray) -> np.ndarray:
    """Multiplicative field (<= 1) of acoustic shadows: dark stripes along beams below a start depth."""
    g = np.ones_like(r)
    lo, hi = preset.shadow_count
    n = int(rng.integers(lo, hi + 1)) if hi > 0 else 0
    half = np.deg2rad(preset.sector_deg / 2.0)
    for _ in range(n):
        t0 = rng.uniform(-0.8, 0.8) * half
        w = np.deg2rad(preset.shadow_width_deg * rng.uniform(0.6, 1.4))
        r0 = rng.uniform(8.0, 0.45 * preset.depth_mm)
        prof = np.exp(-0.5 * ((th - t0) / w) ** 2) * (1.0 / (1.0 + np.exp(-(r - r0) / 3.0)))
        g *= 1.0 - preset.shadow_strength * rng.uniform(0.75, 1.0) * prof
    return g


def dropout_gain(rng: np.random.Generator, preset: VendorPreset, r: np.ndarray, th: np.ndarray,
                 wall: np.ndarray | None) -> np.ndarray:
    """Multiplicative field (<= 1): one wall segment losing its echo (beam parallel to the wall).

    :param wall: boolean myocardium map on the same grid (a random mid-depth spot when None).
    """
    g = np.ones_like(r)
    if preset.dropout_prob <= 0 or rng.uniform() >= preset.dropout_prob:
        return g
    if wall is not None and wall.any():
        idx = np.flatnonzero(wall.ravel())
        # Prefer the walls' sides (largest |theta|), where dropout happens in apical views.
        ths = th.ravel()[idx]
        side = idx[np.abs(ths) >= np.quantile(np.abs(ths), 0.5)]
        k = side[rng.integers(len(side))]
        t0, rc = th.ravel()[k], r.ravel()[k]
    else:
        t0, rc = rng.uniform(-0.5, 0.5) * np.deg2rad(preset.sector_deg / 2), rng.uniform(0.3, 0.6) * r.max()
    w = np.deg2rad(rng.uniform(4.0, 8.0))
    length = rng.uniform(15.0, 30.0)
    prof = np.exp(-0.5 * ((th - t0) / w) ** 4) * np.exp(-0.5 * ((r - rc) / length) ** 4)
    return 1.0 - preset.dropout_strength * prof


def clutter_envelope(rng: np.random.Generator, preset: VendorPreset, r: np.ndarray,
                     sigma: tuple[float, float]) -> np.ndarray:
    """Near-field haze: incoherent, blotchy echo decaying with depth, with reverberation bands."""
    if preset.clutter_strength <= 0:
        return np.zeros_like(r)
    blot = np.exp(0.5 * smooth_noise(rng, r.shape, (sigma[0] * 3 + 1, sigma[1] * 3 + 1)))
    period = rng.uniform(9.0, 14.0)
    bands = 1.0 + 0.25 * np.cos(2 * np.pi * r / period + rng.uniform(0, 2 * np.pi))
    return preset.clutter_strength * np.exp(-r / preset.clutter_depth_mm) * blot * bands


def log_compress(envelope: np.ndarray, preset: VendorPreset) -> np.ndarray:
    """Envelope (1 = bright tissue) -> display grey level in [0, 255] (float)."""
    db = 20.0 * np.log10(np.maximum(envelope, 1e-6))
    return 255.0 * np.clip(1.0 + (db + preset.gain_db) / preset.dynamic_range_db, 0.0, 1.0)


def log_expand(grey01: np.ndarray, preset: VendorPreset) -> np.ndarray:
    """Inverse of :func:`log_compress` for grey levels in [0, 1]: the envelope they display."""
    db = (grey01 - 1.0) * preset.dynamic_range_db - preset.gain_db
    return 10.0 ** (db / 20.0)
