"""Full per-image evaluation cost: segmentation_metrics + check_anatomy on 880 realistic 256² label maps.

Run: ``python -m rl_adapt.benchmarks.metrics [--n 880] [--size 256] [--n-ref 60]``

Target (issue 3): all 880 images in under 60 s on one core. The in-process reference is medpy's
``dc``/``hd``/``hd95``/``assd`` per structure (each of its distance functions recomputes the surfaces and
two full-image distance transforms), timed on the first ``--n-ref`` pairs; the script prints the ratio
per image and checks that both give the same numbers on those pairs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from rl_adapt.measures.anatomy import check_anatomy
from rl_adapt.measures.metrics import STRUCTURES, segmentation_metrics, structure_mask
from scipy import ndimage
from medpy.metric import binary as mb


def heart_label_map(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A random apex-up label map: wobbly truncated-ellipse LV, MYO shell, LA below the base.

    :return: (size, size) uint8 with labels 0..3.
    """
    r, c = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size * rng.uniform(0.38, 0.48), size * rng.uniform(0.42, 0.58)
    ly, lx = size * rng.uniform(0.22, 0.3), size * rng.uniform(0.09, 0.13)
    t = size * rng.uniform(0.03, 0.05)
    theta = np.arctan2(r - cy, c - cx)
    wob = 1 + 0.06 * np.sin(rng.integers(2, 6) * theta + rng.uniform(0, 6)) \
        + 0.03 * np.sin(rng.integers(6, 10) * theta + rng.uniform(0, 6))
    base = cy + rng.uniform(0.2, 0.35) * ly
    rho = np.sqrt(((r - cy) / ly) ** 2 + ((c - cx) / lx) ** 2) / wob
    rho_epi = np.sqrt(((r - cy) / (ly + t)) ** 2 + ((c - cx) / (lx + t)) ** 2) / wob
    m = np.zeros((size, size), np.uint8)
    above = r <= base
    m[(rho_epi <= 1) & above] = 2
    m[(rho <= 1) & above] = 1
    la_ry, la_rx = size * rng.uniform(0.1, 0.16), lx * rng.uniform(0.75, 0.95)
    m[((((r - base) / la_ry) ** 2 + ((c - cx) / la_rx) ** 2) <= 1) & (r > base)] = 3
    return m


def predicted_like(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible prediction of ``gt``: shifted by a few pixels, boundary noise, an occasional blob."""
    pred = np.roll(gt, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
    noise = ndimage.gaussian_filter(rng.normal(size=gt.shape).astype(np.float32), 4) > 0.08
    edge = ndimage.morphological_gradient(pred, size=3) > 0
    flip = edge & noise
    pred = np.where(flip, ndimage.grey_dilation(pred, size=3), pred).astype(np.uint8)
    if rng.random() < 0.3:
        y, x = rng.integers(20, gt.shape[0] - 20, size=2)
        pred[y : y + 5, x : x + 5] = rng.integers(1, 4)
    return pred


def _medpy_metrics(pred: np.ndarray, gt: np.ndarray, spacing) -> dict:
    out = {}
    for s in STRUCTURES:
        a, b = structure_mask(pred, s), structure_mask(gt, s)
        out[s] = {"dice": mb.dc(a, b), "hd": mb.hd(a, b, spacing), "hd95": mb.hd95(a, b, spacing),
                  "assd": mb.assd(a, b, spacing)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=880, help="number of images")
    ap.add_argument("--size", type=int, default=256, help="image side (px)")
    ap.add_argument("--n-ref", type=int, default=60, help="images timed with the medpy reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    gts = [heart_label_map(rng, args.size) for _ in range(args.n)]
    preds = [predicted_like(g, rng) for g in gts]
    spacing = (0.31, 0.154)  # CAMUS-like anisotropic pixels (mm)
    print(f"generated {args.n} pairs of {args.size}² label maps in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    results = [segmentation_metrics(p, g, spacing) for p, g in zip(preds, gts)]
    t_metrics = time.perf_counter() - t0
    t0 = time.perf_counter()
    reports = [check_anatomy(p) for p in preds]
    t_anat = time.perf_counter() - t0
    total = t_metrics + t_anat
    n = args.n
    print(f"segmentation_metrics: {t_metrics:6.2f} s  ({t_metrics / n * 1e3:6.2f} ms/img)")
    print(f"check_anatomy:        {t_anat:6.2f} s  ({t_anat / n * 1e3:6.2f} ms/img)")
    print(f"full metrics:         {total:6.2f} s  ({total / n * 1e3:6.2f} ms/img)  target < 60 s: "
          f"{'OK' if total < 60 else 'TOO SLOW'}")
    print(f"  predictions judged valid: {np.mean([r.valid for r in reports]) * 100:.1f} %, "
          f"ground truths: {np.mean([check_anatomy(g).valid for g in gts[:100]]) * 100:.1f} % (first 100)")

    m = min(args.n_ref, n)
    if m:
        try:
            t0 = time.perf_counter()
            ref = [_medpy_metrics(p, g, spacing) for p, g in zip(preds[:m], gts[:m])]
            t_ref = (time.perf_counter() - t0) / m
        except ImportError:
            print("medpy not installed: reference skipped")
            return 0
        ours = t_metrics / n
        worst = max(abs(results[i][s][k] - ref[i][s][k]) for i in range(m) for s in STRUCTURES for k in ref[i][s])
        print(f"medpy reference:      {t_ref * 1e3:6.2f} ms/img on {m} images  -> ours is {t_ref / ours:.1f}x faster "
              f"(max |difference| {worst:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
