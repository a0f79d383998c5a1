"""Label-free fit of a B-mode scanner model to unlabelled target images: restyling in the envelope domain.

:mod:`rl_adapt.styling` moves a source image's mean spectrum and grey-level ranks toward the target's. It cannot
express what happens before log compression: speckle and electronic noise add up in the echo envelope, a low gain
sinks the blood pool under a noise floor while tissue stays above it, a wider point-spread function makes larger
speckle grains. This module instead fits the acquisition parameters of the project's B-mode model
(:class:`rl_adapt.synth.vendors.VendorPreset`: point-spread function, gain, dynamic range, attenuation and its
time-gain compensation, electronic noise, near-field clutter, shadows and dropout, sector geometry) so that the
source images seen through it (:func:`rl_adapt.synth.domains.apply_vendor_shift`: log expansion, warp, blur,
speckle, noise, re-compression) have the image statistics of the target images. Labels follow the warp, so a
restyled source image keeps a true label map.

Nothing here reads a target label. What is read from the target: its images, and its pixel spacing (a scanner
writes it into every file), which fixes the sector geometry: rows cover the imaging depth and columns the sector
width, so ``spacing_target / spacing_source`` gives the depth ratio and, with it, the opening angle (the source
images are assumed to have the ``source`` preset's 150 mm / 75 degree fan).

Fit (:func:`fit_scanner`): coordinate descent over a grid per parameter (:data:`SEARCH`), each candidate scored by
the squared difference of per-set mean statistics (:func:`image_statistics`: in-sector grey-level quantiles, mean
grey level per depth band, axial and lateral log amplitude spectra of the normalised in-sector image, the deepest
dips of the angular intensity profile), each feature in units of its spread over the target images. The same
source images and seeds serve every candidate (common random numbers), so the score is smooth in the parameters.
With ``refine``, local passes at finer steps than the grid follow (values between grid points).

Caveat, measured and stated in results/camus220/README.md: the project's target presets are made with this same
model, so on them the fit can recover the true scanner; a real foreign scanner is only approximated by it.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

from rl_adapt.config import bounded
from rl_adapt.errors import InputError
from rl_adapt.styling import angular_profile, depth_profile, sector_mask
from rl_adapt.synth.domains import apply_vendor_shift
from rl_adapt.synth.vendors import VENDORS, VendorPreset

__all__ = ["ScannerFitConfig", "ScannerFit", "ScannerObjective", "fit_scanner", "image_statistics",
           "geometry_from_spacing", "SEARCH", "GROUPS"]

log = logging.getLogger(__name__)

SEARCH: dict[str, tuple[float, ...]] = {
    "psf_axial_mm": (0.5, 0.7, 0.9, 1.2, 1.6, 2.0, 2.5),
    "psf_lateral_deg": (0.5, 0.7, 0.9, 1.2, 1.6, 2.0, 2.5),
    "render_scale": (1.0, 0.8, 0.6, 0.45),
    "post_blur_px": (0.0, 0.5, 1.0, 1.5),
    "white_db": (-5.0, -2.5, 0.0, 2.5, 5.0, 7.5, 10.0, 12.5),
    "black_db": (-66.0, -60.0, -54.0, -48.0, -43.0, -38.0, -34.0, -30.0, -26.0),
    "attenuation_db_cm": (0.6, 1.2, 2.0, 3.0),
    "tgc_compensation": (0.4, 0.55, 0.7, 0.85, 1.0),
    "noise_level": (0.002, 0.004, 0.008, 0.015, 0.02, 0.03, 0.05),
    "clutter_strength": (0.0, 0.1, 0.2, 0.3, 0.45),
    "shadow_strength": (0.0, 0.3, 0.6, 0.85),
    "dropout_prob": (0.0, 0.4, 0.8),
}
"""Candidate values of each fitted :class:`VendorPreset` field (the fit starts from the ``source`` preset's). The
display mapping is searched as the echo levels (dB re bright tissue) shown white, ``white_db = -gain_db``, and black,
``black_db = -gain_db - dynamic_range_db``: the bright and the dark quantiles each mostly depend on one of them."""
GROUPS: tuple[tuple[str, ...], ...] = (
    ("white_db",), ("black_db", "noise_level"), ("attenuation_db_cm", "tgc_compensation"),
    ("psf_axial_mm", "psf_lateral_deg"), ("render_scale", "post_blur_px"), ("clutter_strength",),
    ("shadow_strength",), ("dropout_prob",))
"""Fields searched together (every combination of their candidates): the black level and the electronic noise (the
noise floor shows only above the black level), attenuation and its compensation, the two point-spread widths, and
the two display blurs trade off against each other, so one at a time stalls where only a joint move helps."""
SHADOW_COUNT = (1, 3)
"""Shadows per image when ``shadow_strength`` > 0 (a fitted strength of 0 means none)."""
DROPOUT_STRENGTH = 0.85
"""Signal lost in a dropout segment when ``dropout_prob`` > 0."""
QUANTILES = np.linspace(0.05, 0.95, 19)
"""In-sector grey-level quantiles compared."""
STAT_DEPTH_BINS = 16
"""Depth bands of the mean grey-level profile."""
SPECTRUM_BANDS = 12
"""Log-spaced radial frequency bands (2 to 90 cycles per 224 pixels) of the axial and lateral spectra."""
DIPS = 8
"""The deepest angular-profile bins compared (shadows and dropouts run along beam lines)."""
LOCAL_PASSES = 10
"""At most this many local passes after each global sweep."""


@dataclass
class ScannerFitConfig:
    """How the scanner model is fitted (typed config; ``styled.fit`` / ``source_teacher.pairs.fit``)."""

    source_images: int = bounded(8, ge=2)
    """Source images pushed through every candidate scanner (a seeded subset)."""
    target_images: int = bounded(200, ge=2)
    """Target images whose statistics are matched (a seeded subset)."""
    sweeps: int = bounded(2, ge=1)
    """Global sweeps, each trying every combination of each group's candidates (:data:`GROUPS`) and followed by
    local passes over the neighbours of the best so far (one grid step up or down per field, jointly within a group)
    until none helps; the fit stops early when a global sweep after the first moves nothing."""
    refine: int = bounded(0, ge=0)
    """Rounds of finer local passes after the grid search: round ``r`` moves each field by its grid spacing there
    divided by ``2**r`` (jointly within a group, inside the grid's range) until no move helps. A target scanner's
    values usually lie between grid points, and the nearest grid point can score worse than a compensating move of
    another field: under two of the CAMUS-220 sites' scanners the true one snapped to the grid scored worse than
    the grid fit (results/camus220/README.md)."""
    seed: int = 0
    """Seed of the subsets and of the candidate scanners' randomness (the same for every candidate)."""


@dataclass
class ScannerFit:
    """A fitted target scanner and how well it matches."""

    preset: VendorPreset
    """The fitted scanner (name ``fitted``): pass to :func:`rl_adapt.synth.domains.apply_vendor_shift`."""
    score: float
    """Final mismatch (sum over statistic groups of the mean squared standardised difference)."""
    start_score: float
    """Mismatch of the source images as they are (no scanner change)."""
    evaluations: int
    """Candidate scanners scored."""

    def to_dict(self) -> dict:
        """JSON-ready record: the fitted preset's fields, the mismatch before and after, the candidates scored."""
        return {"preset": asdict(self.preset), "mismatch": self.score, "start_mismatch": self.start_score,
                "evaluations": self.evaluations}

    @classmethod
    def from_dict(cls, record: dict) -> "ScannerFit":
        """The fit :meth:`to_dict` recorded (JSON lists become the preset's tuples again)."""
        preset = VendorPreset(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["preset"].items()})
        return cls(preset=preset, score=float(record["mismatch"]), start_score=float(record["start_mismatch"]),
                   evaluations=int(record["evaluations"]))

    def summary(self) -> str:
        """One line with the fitted values that differ from the source preset."""
        src = asdict(VENDORS["source"])
        changed = {k: v for k, v in asdict(self.preset).items() if k not in ("name", "description") and src[k] != v}
        return (f"mismatch {self.start_score:.2f} -> {self.score:.2f} after {self.evaluations} candidates; "
                + ", ".join(f"{k}={_fmt(v)}" for k, v in changed.items()))


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def geometry_from_spacing(source_spacing: Sequence[float], target_spacing: Sequence[float]) -> dict[str, float]:
    """Target depth (mm) and opening angle (degrees) of the fan from the two sets' median pixel spacings.

    Rows cover the depth and columns ``2 depth sin(half angle)``, both over the same pixel count (images are
    assumed to share their size, as after nnU-Net-style export); the source fan is the ``source`` preset's.

    :param source_spacing: ``(row, col)`` spacing in mm of the source images; :param target_spacing: the target's.
    :returns: ``{"depth_mm": ..., "sector_deg": ...}``.
    """
    src = VENDORS["source"]
    rows, cols = (float(t) / float(s) for t, s in zip(target_spacing, source_spacing))
    depth = src.depth_mm * rows
    sin_half = np.sin(np.deg2rad(src.sector_deg / 2.0)) * cols / rows
    half = np.rad2deg(np.arcsin(np.clip(sin_half, np.sin(np.deg2rad(15.0)), np.sin(np.deg2rad(60.0)))))
    return {"depth_mm": float(depth), "sector_deg": float(2.0 * half)}


def _band_spectrum(z: np.ndarray) -> np.ndarray:
    """(2 * SPECTRUM_BANDS,) log mean amplitude in radial bands, axial (rows) and lateral (columns) wedges."""
    H, W = z.shape
    amp = np.abs(np.fft.fft2(z)) / np.sqrt(max(int((z != 0).sum()), 1))
    fy = np.fft.fftfreq(H)[:, None] * 224.0
    fx = np.fft.fftfreq(W)[None, :] * 224.0
    rad = np.hypot(fy, fx)
    edges = np.geomspace(2.0, 90.0, SPECTRUM_BANDS + 1)
    band = np.digitize(rad, edges) - 1
    out = []
    for wedge in (np.abs(fy) >= np.abs(fx), np.abs(fx) > np.abs(fy)):
        ok = wedge & (band >= 0) & (band < SPECTRUM_BANDS)
        s = np.bincount(band[ok], amp[ok], SPECTRUM_BANDS) / np.maximum(np.bincount(band[ok], None, SPECTRUM_BANDS), 1)
        out.append(np.log(s + 1e-6))
    return np.concatenate(out)


def image_statistics(image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The statistics one image contributes to the fit (all label-free).

    :param image: ``(H, W)`` uint8 B-mode image (apex up, black outside the fan).
    :param mask: its ``(H, W)`` bool sector when known (:func:`rl_adapt.styling.sector_mask` otherwise).
    :returns: ``quantiles`` (19,) in-sector grey levels / 255; ``depth`` (16,) mean grey level / 255 per depth
        band; ``spectrum`` (24,) log amplitudes (axial then lateral bands) of the in-sector image normalised to zero
        mean and unit std; ``dips`` (8,) the lowest values of the angular profile divided by its trend (1: no dip).
    """
    im = np.asarray(image)
    if im.ndim != 2 or im.size == 0:
        raise InputError(None, f"scanner fit: expected a 2D image, got shape {im.shape}")
    grey = im.astype(np.float64) / 255.0
    mask = sector_mask(im) if mask is None else np.asarray(mask, bool)
    vals = grey[mask]
    depth = depth_profile(grey, mask, STAT_DEPTH_BINS)  # grey is in [0, 1]: its full scale is 1
    depth = np.where(np.isfinite(depth), depth, vals.mean())
    z = np.where(mask, (grey - vals.mean()) / max(vals.std(), 1e-6), 0.0)
    dips = np.sort(angular_profile(grey, mask))[:DIPS]
    return {"quantiles": np.quantile(vals, QUANTILES), "depth": depth, "spectrum": _band_spectrum(z), "dips": dips}


def _stack(stats: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([s[k] for s in stats]) for k in stats[0]}


def _mismatch(shifted: dict[str, np.ndarray], target_mean: dict[str, np.ndarray],
              target_sd: dict[str, np.ndarray]) -> float:
    return float(sum(np.mean(((shifted[k].mean(0) - target_mean[k]) / target_sd[k]) ** 2) for k in target_mean))


def _get(preset: VendorPreset, key: str) -> float:
    if key == "white_db":
        return -preset.gain_db
    if key == "black_db":
        return -preset.gain_db - preset.dynamic_range_db
    return getattr(preset, key)


def _with_value(preset: VendorPreset, key: str, value: float) -> VendorPreset:
    if key == "white_db":  # keep the black level
        black = _get(preset, "black_db")
        return replace(preset, gain_db=-value, dynamic_range_db=max(value - black, 6.0))
    if key == "black_db":
        return replace(preset, dynamic_range_db=max(-preset.gain_db - value, 6.0))
    if key == "shadow_strength":
        return replace(preset, shadow_strength=value, shadow_count=SHADOW_COUNT if value > 0 else (0, 0))
    if key == "dropout_prob":
        return replace(preset, dropout_prob=value, dropout_strength=DROPOUT_STRENGTH if value > 0 else 0.0)
    return replace(preset, **{key: value})


class ScannerObjective:
    """The fit's score of a candidate scanner: how far the source images seen through it are from the target images.

    :param source_images: ``(H, W)`` uint8 source images (a seeded subset of ``cfg.source_images`` is used).
    :param target_images: ``(H, W)`` uint8 target images (a seeded subset of ``cfg.target_images``).
    :param source_labels: optional label maps of ``source_images`` (they place wall dropout).
    :raises InputError: no source or no target image, or an image that is not 2D.
    """

    def __init__(self, source_images: Sequence[np.ndarray], target_images: Sequence[np.ndarray],
                 cfg: ScannerFitConfig, source_labels: Sequence[np.ndarray | None] | None = None):
        if len(source_images) == 0 or len(target_images) == 0:
            raise InputError(None, "scanner fit needs source and target images")
        rng = np.random.default_rng(cfg.seed)
        si = np.sort(rng.permutation(len(source_images))[:cfg.source_images])
        ti = np.sort(rng.permutation(len(target_images))[:cfg.target_images])
        self.seed = cfg.seed
        self.source = [np.asarray(source_images[i]) for i in si]
        self.labels = [None if source_labels is None else source_labels[i] for i in si]
        tgt = _stack([image_statistics(target_images[i]) for i in ti])
        self.target_mean = {k: v.mean(0) for k, v in tgt.items()}
        self.target_sd = {k: v.std(0) + 0.02 * (np.abs(v.mean(0)).mean() + 1e-3) for k, v in tgt.items()}
        self.start_score = _mismatch(_stack([image_statistics(s) for s in self.source]), self.target_mean,
                                     self.target_sd)
        self.evaluations = 0
        self._masks: tuple[tuple | None, list[np.ndarray]] = (None, [])

    def score_images(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
        """Mismatch of source images restyled some other way (lower is closer), on the scale of :meth:`__call__`.

        :param images: ``(H, W)`` uint8 restyled images (any number; their mean statistics are compared).
        :param masks: their ``(H, W)`` bool sectors.
        """
        stats = [image_statistics(im, m) for im, m in zip(images, masks)]
        return _mismatch(_stack(stats), self.target_mean, self.target_sd)

    def __call__(self, preset: VendorPreset) -> float:
        """Mismatch of ``preset`` (lower is closer; 0 = the same mean statistics)."""
        self.evaluations += 1
        shifted = [apply_vendor_shift(im, preset, seed=self.seed * 1000 + j, label=lab)[0]
                   for j, (im, lab) in enumerate(zip(self.source, self.labels))]
        geometry = (preset.depth_mm, preset.sector_deg)
        if self._masks[0] != geometry:  # one sector per image and fan geometry, found on the source look through it
            reference = replace(VENDORS["source"], name="fitted", depth_mm=preset.depth_mm,
                                sector_deg=preset.sector_deg)
            self._masks = (geometry, [sector_mask(apply_vendor_shift(im, reference, seed=self.seed * 1000 + j,
                                                                     label=lab)[0])
                                      for j, (im, lab) in enumerate(zip(self.source, self.labels))])
        stats = [image_statistics(s, m) for s, m in zip(shifted, self._masks[1])]
        return _mismatch(_stack(stats), self.target_mean, self.target_sd)


def fit_scanner(source_images: Sequence[np.ndarray], target_images: Sequence[np.ndarray],
                source_spacing: Sequence[float], target_spacing: Sequence[float],
                cfg: ScannerFitConfig | None = None, source_labels: Sequence[np.ndarray | None] | None = None,
                progress: bool = False, groups: Sequence[tuple[str, ...]] = GROUPS) -> ScannerFit:
    """Fit the target scanner, label-free (see the module docstring).

    :param source_images: ``(H, W)`` uint8 source images (the fit uses a seeded subset of ``cfg.source_images``).
    :param target_images: ``(H, W)`` uint8 target images (a seeded subset of ``cfg.target_images``).
    :param source_spacing: median ``(row, col)`` spacing of the source images, mm;
    :param target_spacing: the same of the target images (sets the fan geometry, :func:`geometry_from_spacing`).
    :param source_labels: optional label maps of ``source_images`` (they place wall dropout as the restyling will).
    :param progress: show a progress bar over the candidates.
    :param groups: the fields searched, jointly within each group (default :data:`GROUPS`; keys of :data:`SEARCH`).
    :returns: the :class:`ScannerFit`.
    :raises InputError: no source or no target image, or an image that is not 2D.
    """
    cfg = cfg or ScannerFitConfig()
    objective = ScannerObjective(source_images, target_images, cfg, source_labels)
    start = objective.start_score
    best = replace(VENDORS["source"], name="fitted", description="fitted to unlabelled target images",
                   **geometry_from_spacing(source_spacing, target_spacing))
    best_score = objective(best)
    from tqdm import tqdm

    def index(key: str, preset: VendorPreset) -> int:
        return int(np.argmin(np.abs(np.asarray(SEARCH[key]) - _get(preset, key))))

    def spacing(key: str, preset: VendorPreset) -> float:
        grid = np.sort(np.asarray(SEARCH[key], dtype=float))
        i = int(np.clip(np.searchsorted(grid, _get(preset, key)), 1, len(grid) - 1))
        return float(grid[i] - grid[i - 1])

    def candidates(group: tuple[str, ...], local: bool, fine: int = 0):
        if not local:
            yield from itertools.product(*(SEARCH[k] for k in group))
            return
        if fine:  # steps of 1/2**fine of the grid spacing, inside the grid's range
            for steps in itertools.product((-1, 0, 1), repeat=len(group)):
                values = tuple(_get(best, k) + d * spacing(k, best) / 2 ** fine for k, d in zip(group, steps))
                if any(steps) and all(min(SEARCH[k]) - 1e-9 <= v <= max(SEARCH[k]) + 1e-9
                                      for k, v in zip(group, values)):
                    yield values
            return
        for steps in itertools.product((-1, 0, 1), repeat=len(group)):
            idx = [index(k, best) + d for k, d in zip(group, steps)]
            if any(steps) and all(0 <= i < len(SEARCH[k]) for k, i in zip(group, idx)):
                yield tuple(SEARCH[k][i] for k, i in zip(group, idx))

    def one_pass(local: bool, bar, fine: int = 0) -> bool:
        nonlocal best, best_score
        moved = False
        for group in groups:
            for values in list(candidates(group, local, fine)):
                bar.update(1)
                if all(np.isclose(v, _get(best, k)) for k, v in zip(group, values)):
                    continue
                cand = best
                for k, v in zip(group, values):
                    cand = _with_value(cand, k, float(v))
                s = objective(cand)
                if s < best_score - 1e-9:
                    best, best_score, moved = cand, s, True
        return moved

    def descend(bar, fine: int = 0) -> None:  # local passes (grid neighbours, or finer steps) until none helps
        for _ in range(LOCAL_PASSES):
            if not one_pass(True, bar, fine):
                break

    with tqdm(desc="fit scanner", disable=not progress) as bar:
        for sweep in range(cfg.sweeps):
            moved = one_pass(False, bar)
            descend(bar)
            log.info("scanner fit sweep %d: mismatch %.3f", sweep + 1, best_score)
            if sweep > 0 and not moved:
                break
        for fine in range(1, cfg.refine + 1):
            descend(bar, fine)
            log.info("scanner fit refinement %d (1/%d of the grid spacing): mismatch %.3f", fine, 2 ** fine,
                     best_score)
    fit = ScannerFit(preset=best, score=best_score, start_score=start, evaluations=objective.evaluations)
    log.info("fitted target scanner: %s", fit.summary())
    return fit
