"""Synthetic apical 2CH/4CH echocardiography with exact labels, for offline demos and tests.

``generate_domain(domain, n_patients, seed)`` draws ``n_patients`` anatomies (shape model in
:mod:`rl_adapt.synth.shapes`) and renders each at ED and ES in the 2CH and 4CH views with one scanner
preset (:data:`VENDORS`, rendering chain in :mod:`rl_adapt.synth.vendors`). Ground-truth EDV/ESV/EF come
from the shape model's biplane method of discs and go to ``meta``.

Seeding: the anatomy of patient ``k`` depends only on ``(seed, k)``, so the same seed gives the same
patients in every domain (paired domains); the rendering noise also depends on the domain, view and phase.
Use another seed or ``first_patient`` for disjoint patient sets. Same arguments -> identical arrays.
"""
from __future__ import annotations

import logging
import zlib
from typing import Iterable

import numpy as np
from scipy import ndimage as ndi

from rl_adapt.data.case import Case
from rl_adapt.errors import InputError
from rl_adapt.synth.shapes import (PHASES, VIEWS, PatientAnatomy, clinical_truth, fit_in_sector, label_map,
                                   sample_anatomy, structures, view_geometry)
from rl_adapt.synth.vendors import (VENDORS, VendorPreset, clutter_envelope, dropout_gain, fan_grid, get_preset,
                                    log_compress, log_expand, net_attenuation_db, polar_grid, polar_to_cart,
                                    psf_sigma_px, shadow_gain, smooth_noise, speckle_field)
from dataclasses import replace
from tqdm import tqdm

__all__ = ["VENDORS", "VendorPreset", "generate_domain", "render_view", "apply_vendor_shift", "shifted_spacing",
           "patient_anatomy"]

log = logging.getLogger(__name__)

_QUALITY = {"Good": (1.0, 0.0), "Medium": (1.6, 0.06), "Poor": (2.6, 0.15)}
"""Image quality -> (noise multiplier, extra clutter)."""


def _rng(*keys: int | str) -> np.random.Generator:
    ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(ints))


def patient_anatomy(seed: int, index: int) -> PatientAnatomy:
    """The anatomy of patient number ``index`` (1-based) under ``seed`` (independent of the domain)."""
    anat = sample_anatomy(_rng(int(seed), int(index), "anatomy"))
    return fit_in_sector(anat, min(p.sector_deg for p in VENDORS.values()) / 2.0)


def _echogenicity(s: dict[str, np.ndarray], r: np.ndarray, preset: VendorPreset,
                  rng: np.random.Generator, sig: tuple[float, float]) -> np.ndarray:
    shape = r.shape
    tex = np.exp(0.45 * smooth_noise(rng, shape, (sig[0] * 6 + 2, sig[1] * 6 + 2)))
    e = preset.tissue_echo * tex
    # Chest wall: layered bright echoes in the first centimetres.
    wall_layers = 0.75 * (1 + 0.6 * np.sin(2 * np.pi * r / rng.uniform(4.0, 6.0))) * (r < rng.uniform(9.0, 14.0))
    e = np.maximum(e, wall_layers)
    myo_tex = np.exp(0.25 * smooth_noise(rng, shape, (sig[0] * 2 + 1, sig[1] * 2 + 1)))
    for key, level in (("peri", 1.0), ("la_wall", 0.6), ("rv_wall", 0.6)):
        if key in s:
            e = np.where(s[key], level * myo_tex, e)
    e = np.where(s["MYO"], preset.myo_echo * myo_tex, e)
    blood = s["LV"] | s["LA"] | s.get("RV", False) | s.get("RA", False)
    e = np.where(blood, preset.blood_echo * (1 + 0.3 * myo_tex), e)
    e = np.where(s["valve"], 0.7, e)
    return e


def render_view(anat: PatientAnatomy, view: str, phase: str, preset: VendorPreset, size: int = 128,
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Render one B-mode image and its exact label map.

    :returns: ``(image (size, size) uint8, label (size, size) uint8, spacing (row, col) mm)``; apex up,
        black outside the fan, labels 0 outside the fan.
    """
    rng = rng or np.random.default_rng(0)
    g = view_geometry(anat, view, phase)
    grid = fan_grid(preset, (size, size))
    label = label_map(g, grid.x, grid.z, grid.inside)
    n = max(16, int(round(2 * size * preset.render_scale)))
    r, th = polar_grid(preset, n, n)
    s = structures(g, r * np.sin(th), r * np.cos(th))
    sig = psf_sigma_px(preset, n, n)
    noise_mult, extra_clutter = _QUALITY[anat.quality]
    e = _echogenicity(s, r, preset, rng, sig)
    e = e * dropout_gain(rng, preset, r, th, s["MYO"])
    env = speckle_field(rng, e, sig)
    att = 10.0 ** (-preset.attenuation_db_cm * r / 10.0 / 20.0)
    tgc = 10.0 ** (preset.tgc_compensation * preset.attenuation_db_cm * r / 10.0 / 20.0)
    noise = preset.noise_level * noise_mult * np.hypot(rng.standard_normal(r.shape), rng.standard_normal(r.shape))
    env = np.hypot(env * att, noise / np.sqrt(2)) * tgc
    if preset.clutter_strength + extra_clutter > 0:
        p = _with(preset, clutter_strength=preset.clutter_strength + extra_clutter)
        env = np.hypot(env, clutter_envelope(rng, p, r, sig))
    env = env * shadow_gain(rng, preset, r, th)
    grey = log_compress(env, preset)
    if preset.render_scale < 1.0:  # coarse acquisition grid: scan-convert small, then upsample
        small = max(8, int(round(size * preset.render_scale)))
        cgrid = fan_grid(preset, (small, small))
        img = polar_to_cart(grey, preset, cgrid)
        img = ndi.zoom(img, (size / small, size / small), order=1)[:size, :size]
    else:
        img = polar_to_cart(grey, preset, grid)
    if preset.post_blur_px > 0:
        img = ndi.gaussian_filter(img, preset.post_blur_px)
    img[~grid.inside] = 0
    return np.clip(np.round(img), 0, 255).astype(np.uint8), label, grid.spacing


def _with(preset: VendorPreset, **changes) -> VendorPreset:
    return replace(preset, **changes)


def generate_domain(domain: str, n_patients: int, seed: int = 0, size: int = 128, first_patient: int = 1,
                    views: Iterable[str] = VIEWS, phases: Iterable[str] = PHASES,
                    progress: bool = False) -> list[Case]:
    """Synthetic cases of one domain: ``n_patients`` x views x phases (4 per patient by default).

    :param domain: a key of :data:`VENDORS` ("source", "target-lowgain", "target-blur", "target-shadow").
    :param seed: anatomy of patient k depends on (seed, k) only; rendering also on the domain.
    :param size: image side in pixels (images are size x size, spacing from the preset's sector).
    :param first_patient: number of the first patient (names ``patient{k:04d}_{view}_{phase}``).
    :returns: cases sorted by name, uint8 images, exact uint8 labels, meta with patient, view, phase,
        EF/EDV/ESV (%, ml), quality, sex, age, ed_frame/es_frame/nb_frames, domain, split="training".
    """
    preset = get_preset(domain)
    if n_patients < 1:
        raise InputError(None, f"number of patients must be >= 1, got {n_patients}")
    if size < 32:
        raise InputError(None, f"image size must be >= 32 pixels, got {size}")
    cases: list[Case] = []
    ids = range(first_patient, first_patient + n_patients)
    if progress:
        ids = tqdm(ids, desc=f"synth {domain}", unit="patient", disable=None)
    for k in ids:
        anat = patient_anatomy(seed, k)
        truth = clinical_truth(anat)
        frames = _rng(seed, k, "frames")
        nb = int(frames.integers(14, 24))
        es = int(frames.integers(nb - 6, nb + 1))
        patient = f"patient{k:04d}"
        for view in views:
            for phase in phases:
                rng = _rng(seed, k, domain, view, phase)
                img, lab, spacing = render_view(anat, view, phase, preset, size, rng)
                meta = {"patient": patient, "view": view, "phase": phase, "quality": anat.quality,
                        "sex": anat.sex, "age": anat.age, "ed_frame": 1, "es_frame": es, "nb_frames": nb,
                        "domain": domain, "split": "training", **truth}
                cases.append(Case(f"{patient}_{view}_{phase}", img, lab, spacing, meta))
    log.info("generated %d %s cases", len(cases), domain)
    return sorted(cases, key=lambda c: c.name)


# ------------------------------------------------------------------------------------ vendor shift
def _preset(preset: str | VendorPreset) -> VendorPreset:
    return preset if isinstance(preset, VendorPreset) else get_preset(preset)


def shifted_spacing(spacing: tuple[float, float], preset_name: str | VendorPreset) -> tuple[float, float]:
    """Pixel spacing after :func:`apply_vendor_shift` (the target's depth/sector rescale the grid)."""
    src, tgt = VENDORS["source"], _preset(preset_name)
    hs, ht = np.deg2rad(src.sector_deg / 2), np.deg2rad(tgt.sector_deg / 2)
    return (spacing[0] * tgt.depth_mm / src.depth_mm,
            spacing[1] * tgt.depth_mm * np.sin(ht) / (src.depth_mm * np.sin(hs)))


def _fan_of(image: np.ndarray) -> np.ndarray:
    fan = ndi.binary_opening(image > 0, iterations=1)
    fan = ndi.binary_fill_holes(ndi.binary_closing(fan, iterations=2))
    return fan if fan.mean() > 0.05 else np.ones_like(fan)


def apply_vendor_shift(image: np.ndarray, preset_name: str | VendorPreset, seed: int,
                       label: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Give any apical image (synthetic source or real CAMUS) the look of a target scanner preset.

    The input is assumed to show a fan that fills the image box, apex at the top centre, displayed with
    the ``source`` preset's log compression. Geometry changes of the target (deeper sector, other
    angle) warp image and label alike (label nearest-neighbour; :func:`shifted_spacing` gives the new
    spacing); regions the input did not image (beyond its depth or angle) are filled with tissue speckle.

    :param image: (H, W) uint8 (0..255) or float (scaled by its 0.5/99.5 percentiles) B-mode image.
    :param preset_name: a key of :data:`VENDORS` ("source" returns a copy unchanged) or a :class:`VendorPreset`
        (e.g. one fitted to unlabelled target images by :func:`rl_adapt.scanner_fit.fit_scanner`; its ``name`` seeds
        the randomness with ``seed``).
    :param seed: all randomness (speckle, noise, shadow and dropout placement) comes from it.
    :param label: optional (H, W) uint8 label map (also used to place wall dropout).
    :returns: ``(image (H, W) uint8, label (H, W) uint8 or None)``.
    """
    tgt, src = _preset(preset_name), VENDORS["source"]
    image = np.asarray(image)
    if image.ndim != 2:
        raise InputError(None, f"apply_vendor_shift expects a 2D image, got shape {image.shape}")
    if label is not None and np.asarray(label).shape != image.shape:
        raise InputError(None, f"label shape {np.shape(label)} differs from image shape {image.shape}")
    if tgt.name == "source":
        return image.copy(), None if label is None else np.asarray(label).copy()
    rng = _rng(int(seed), tgt.name, "shift")
    H, W = image.shape
    if image.dtype == np.uint8:
        grey = image.astype(np.float64) / 255.0
    else:
        lo, hi = np.percentile(image, [0.5, 99.5])
        grey = np.clip((image.astype(np.float64) - lo) / max(hi - lo, 1e-9), 0, 1)
    fan_in = _fan_of(image)
    sgrid, tgrid = fan_grid(src, (H, W)), fan_grid(tgt, (H, W))
    # Target pixel -> source pixel (same physical point).
    si = tgrid.z / sgrid.spacing[0] - 0.5
    sj = tgrid.x / sgrid.spacing[1] + W / 2.0 - 0.5
    inb = (si >= -0.5) & (si <= H - 0.5) & (sj >= -0.5) & (sj <= W - 0.5)
    ni, nj = np.clip(np.round(si), 0, H - 1).astype(int), np.clip(np.round(sj), 0, W - 1).astype(int)
    covered = inb & fan_in[ni, nj] & tgrid.inside
    env = log_expand(ndi.map_coordinates(grey, [si, sj], order=1, mode="nearest"), src)
    new_label = None
    if label is not None:
        new_label = np.where(covered, np.asarray(label)[ni, nj], 0).astype(np.uint8)
    # Resolution: blur up to the target PSF (axial rows; lateral at mid-depth).
    ax = np.sqrt(max(tgt.psf_axial_mm ** 2 - src.psf_axial_mm ** 2, 0.0)) / tgrid.spacing[0]
    lat_mm = np.deg2rad(np.sqrt(max(tgt.psf_lateral_deg ** 2 - src.psf_lateral_deg ** 2, 0.0))) * tgt.depth_mm / 2
    if ax > 0.2 or lat_mm > 0.2:
        env = ndi.gaussian_filter(env, (ax, lat_mm / tgrid.spacing[1]))
    # Target speckle (mean-1 multiplicative), computed on the polar grid and scan-converted.
    n = 2 * max(H, W)
    r, th = polar_grid(tgt, n, n)
    sig = psf_sigma_px(tgt, n, n)
    spk = speckle_field(rng, np.ones_like(r), sig)
    spk_c = polar_to_cart(spk / spk.mean(), tgt, tgrid)
    filler = np.median(env[covered]) if covered.any() else 0.1
    env = np.where(covered, env * spk_c ** 0.7, filler * 0.7 * spk_c)
    # Attenuation difference, noise, clutter, shadows, dropout.
    env = env * 10.0 ** (-(net_attenuation_db(tgt, tgrid.r) - net_attenuation_db(src, tgrid.r)) / 20.0)
    tgc = 10.0 ** (tgt.tgc_compensation * tgt.attenuation_db_cm * tgrid.r / 10.0 / 20.0)
    noise = tgt.noise_level * np.hypot(rng.standard_normal((H, W)), rng.standard_normal((H, W))) / np.sqrt(2)
    env = np.hypot(env, noise * tgc)
    if tgt.clutter_strength > 0:
        env = np.hypot(env, polar_to_cart(clutter_envelope(rng, tgt, r, sig), tgt, tgrid))
    env = env * polar_to_cart(shadow_gain(rng, tgt, r, th), tgt, tgrid)
    wall = None if new_label is None else new_label == 2
    env = env * dropout_gain(rng, tgt, tgrid.r, tgrid.th, wall)
    out = log_compress(env, tgt)
    if tgt.render_scale < 1.0:
        small = max(8, int(round(H * tgt.render_scale))), max(8, int(round(W * tgt.render_scale)))
        out = ndi.zoom(ndi.zoom(out, (small[0] / H, small[1] / W), order=1), (H / small[0], W / small[1]), order=1)
        out = np.pad(out, ((0, max(0, H - out.shape[0])), (0, max(0, W - out.shape[1]))), mode="edge")[:H, :W]
    if tgt.post_blur_px > 0:
        out = ndi.gaussian_filter(out, tgt.post_blur_px)
    out[~tgrid.inside] = 0
    return np.clip(np.round(out), 0, 255).astype(np.uint8), new_label
