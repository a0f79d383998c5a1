"""Could `degrade` restyling copy a target's look over depth better? A label-free probe on the fit's own source images.

`mode: auto` restyles the foreign site with `degrade` (the fitted scanner matches it worse), and of degrade's
mismatch with the target images' statistics (`rl_adapt.scanner_fit.ScannerObjective`) the depth profile is the
largest part: the foreign scanner adds a near-field haze, which degrade's multiplicative depth gain cannot make. Two
ways to move grey levels per depth instead, each applied after degrade (depth and angular profiles, as configured):

- `quantiles over depth, B bands`: each depth band's grey levels mapped by rank onto the same band's quantile
  function of one target image (interpolated between neighbouring band centres);
- `additive depth offset`: log-compressed grey levels shift with a gain change, so each image gets the offset that
  brings its own depth profile to the target images' mean profile.

Also printed: the untouched source images and, for the foreign site, the source images through the foreign scanner
itself (`foreign_shift.foreign_look`: the floor a restyling could reach). No label is read.

Usage: python results/camus220/probe_depth_restyling.py SOURCE_DATASET TARGET_DATASET   (one line per variant)
"""
import sys
from pathlib import Path

import numpy as np

from rl_adapt.config import load_config
from rl_adapt.data.readers import read_dataset
from rl_adapt.engine.settings import AdaptConfig
from rl_adapt.scanner_fit import ScannerObjective, _stack, image_statistics
from rl_adapt.styling import DEPTH_BINS, depth_bins, depth_profile, estimate_style, restyle, sector_mask
from rl_adapt.training.styled_source import AUTO_REPEATS, _subset

sys.path.insert(0, str(Path(__file__).parent))
from foreign_shift import foreign_look  # noqa: E402

Q = 64


def band_quantiles(image: np.ndarray, bands: int) -> np.ndarray:
    """(bands, Q) in-sector quantile functions of one image per depth band, fractions of full scale."""
    mask = sector_mask(image)
    band = depth_bins(mask, bands)[mask]
    vals = image[mask].astype(np.float64) / 255.0
    p = np.linspace(0, 1, Q)
    return np.stack([np.quantile(vals[band == k] if (band == k).any() else vals, p) for k in range(bands)])


def match_over_depth(image: np.ndarray, mask: np.ndarray, qf: np.ndarray) -> np.ndarray:
    """Map each depth band's grey levels by rank onto ``qf`` (bands, Q), blending neighbouring bands' maps."""
    bands = qf.shape[0]
    rows = np.flatnonzero(mask.any(axis=1))
    r = (np.arange(image.shape[0]) - rows[0] + 0.5) / max(rows[-1] - rows[0] + 1, 1)
    rr = np.broadcast_to(r[:, None], image.shape)[mask]
    vals = image[mask].astype(np.float64)
    own = np.clip((rr * bands).astype(int), 0, bands - 1)
    pos = np.clip(rr * bands - 0.5, 0, bands - 1)
    lo = np.floor(pos).astype(int)
    hi, w = np.minimum(lo + 1, bands - 1), pos - lo
    mapped = np.zeros((bands, vals.size))
    for k in range(bands):
        ref = np.sort(vals[own == k]) if (own == k).sum() > 1 else np.sort(vals)
        sel = (lo == k) | (hi == k)
        cdf = (np.searchsorted(ref, vals[sel], side="right") - 0.5) / ref.size
        mapped[k, sel] = np.interp(np.clip(cdf, 0, 1), np.linspace(0, 1, Q), qf[k])
    idx = np.arange(vals.size)
    out = image.astype(np.float64).copy()
    out[mask] = ((1 - w) * mapped[lo, idx] + w * mapped[hi, idx]) * 255.0
    return out


def depth_offset(image: np.ndarray, mask: np.ndarray, target_depth: np.ndarray) -> np.ndarray:
    """Add to every row the difference between the target's mean depth profile and this image's own."""
    own = depth_profile(image, mask)
    own = np.where(np.isfinite(own), own, np.nanmean(own))
    rows = np.flatnonzero(mask.any(axis=1))
    r = (np.arange(image.shape[0]) - rows[0] + 0.5) / max(rows[-1] - rows[0] + 1, 1)
    shift = np.interp(r, (np.arange(DEPTH_BINS) + 0.5) / DEPTH_BINS, target_depth - own)[:, None] * 255.0
    return np.where(mask, image + shift, image)


def main(source_dir: str, target_dir: str) -> None:
    cfg = load_config(AdaptConfig, Path(__file__).parents[2] / "configs" / "adapt_cpu.yaml", []).source_teacher.pairs
    source = [c for c in read_dataset(source_dir, with_labels=True) if c.label is not None]
    target = read_dataset(target_dir, with_labels=False)
    objective = ScannerObjective([c.image for c in source], [c.image for c in target], cfg.fit,
                                 [c.label for c in source])
    rng = np.random.default_rng(cfg.fit.seed)
    style = estimate_style([source[i].image for i in _subset(len(source), cfg.style_images, rng)],
                           [target[i].image for i in _subset(len(target), cfg.style_images, rng)])
    picked = _subset(len(target), cfg.style_images, rng)
    masks = [sector_mask(im) for im in objective.source]

    def report(name: str, images: list[np.ndarray], image_masks: list[np.ndarray]) -> None:
        u8 = [np.clip(np.rint(im), 0, 255).astype(np.uint8) for im in images]
        stats = _stack([image_statistics(im, m) for im, m in zip(u8, image_masks)])
        parts = {k: float(np.mean(((stats[k].mean(0) - objective.target_mean[k]) / objective.target_sd[k]) ** 2))
                 for k in stats}
        print(f"{name:32s} mismatch {sum(parts.values()):.3f}  "
              + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)

    report("source as is", objective.source, masks)
    degraded = [restyle(im, style, rng, cfg.spectrum_strength, cfg.histogram, mode="degrade", depth=cfg.depth,
                        angular=cfg.angular) for im in objective.source for _ in range(AUTO_REPEATS)]
    rep_masks = [m for m in masks for _ in range(AUTO_REPEATS)]
    report("degrade (as configured)", degraded, rep_masks)
    for bands in (8, 16, 32):
        bank = [band_quantiles(target[i].image, bands) for i in picked]
        report(f"  + quantiles over depth, {bands} bands",
               [match_over_depth(im, m, bank[int(rng.integers(len(bank)))]) for im, m in zip(degraded, rep_masks)],
               rep_masks)
    report("  + additive depth offset", [depth_offset(im, m, style.target_depth.astype(np.float64))
                                         for im, m in zip(degraded, rep_masks)], rep_masks)
    if "foreign" in target_dir:
        looks = [foreign_look(im, np.random.default_rng(i)) for i, im in enumerate(objective.source)]
        report("the foreign scanner itself", looks, [sector_mask(im) for im in looks])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
