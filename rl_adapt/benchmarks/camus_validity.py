"""Anatomical validity of the real CAMUS expert masks, per preset, with the failing checks and the time.

Run: ``python -m rl_adapt.benchmarks.camus_validity [--data ../shared/data/Dataset501_CAMUS224] [--png /tmp/anat]``

The 224² masks of ``Dataset501_CAMUS224`` were resized from the original CAMUS geometry by interpolating
the label *values*: a one-pixel sandwich whose label lies strictly between its two opposite neighbours
(1 between 0 and 2 along the outer myocardial border, 2 between 1 and 3 on the mitral plane, 2 between 0
and 3 along the atrium) is the signature of that interpolation. :func:`remove_resize_artefacts` undoes
it (each such pixel takes the most frequent other label among its 8 neighbours; then pixels outside each
structure's largest component become background) so that the table can show both the raw files and
what the checks say about the anatomy itself.
"""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np

from rl_adapt.measures.anatomy import ALL_CHECKS, AnatomyConfig, check_anatomy
from rl_adapt.data.label_repair import interpolation_artefacts, remove_resize_artefacts  # noqa: F401
import SimpleITK as sitk
import matplotlib
import matplotlib.pyplot as plt

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "Dataset501_CAMUS224"
_EIGHT = np.ones((3, 3), dtype=bool)


def read_masks(folder: Path) -> tuple[list[str], list[np.ndarray]]:
    """All ``labelsTr/*.nii.gz`` as (names, (H, W) uint8 arrays), read with SimpleITK."""
    files = sorted((folder / "labelsTr").glob("*.nii.gz"))
    names = [f.name[: -len(".nii.gz")] for f in files]
    return names, [sitk.GetArrayFromImage(sitk.ReadImage(str(f))).astype(np.uint8) for f in files]


def _table(title: str, names: list[str], masks: list[np.ndarray], cfg: AnatomyConfig) -> dict:
    t0 = time.perf_counter()
    reports = [check_anatomy(m, cfg) for m in masks]
    dt = time.perf_counter() - t0
    fails = collections.Counter(f for r in reports for f in r.failed)
    valid = float(np.mean([r.valid for r in reports]))
    print(f"\n{title}: {valid * 100:.1f} % valid of {len(masks)} masks  ({dt:.1f} s, {dt / len(masks) * 1e3:.2f} ms/mask)")
    print(f"  {'check':<20} {'fails':>6} {'%':>6}   value p5 / p50 / p95")
    for name in ALL_CHECKS:
        if name not in cfg.checks:
            continue
        vals = np.array([r.values()[name] for r in reports], dtype=float)
        p = np.nanpercentile(vals, [5, 50, 95]) if np.isfinite(vals).any() else [np.nan] * 3
        print(f"  {name:<20} {fails[name]:>6} {fails[name] / len(masks) * 100:>6.1f}   "
              f"{p[0]:.3g} / {p[1]:.3g} / {p[2]:.3g}")
    return {"valid": valid, "seconds": dt, "fails": dict(fails), "reports": reports}


def _save_pngs(out: Path, names, masks, reports, n: int = 6) -> None:
    matplotlib.use("Agg")

    out.mkdir(parents=True, exist_ok=True)
    shown = 0
    for name, m, r in zip(names, masks, reports):
        if r.valid or shown >= n:
            continue
        fig, ax = plt.subplots(1, 2, figsize=(8, 4))
        ax[0].imshow(m, vmin=0, vmax=3, interpolation="nearest")
        ax[0].set_title(name, fontsize=8)
        ax[1].imshow(interpolation_artefacts(m), interpolation="nearest", cmap="gray")
        ax[1].set_title("failed: " + ", ".join(r.failed), fontsize=7)
        fig.savefig(out / f"{name}.png", dpi=90)
        plt.close(fig)
        shown += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="nnU-Net raw dataset with labelsTr/")
    ap.add_argument("--png", type=Path, default=None, help="save a few failing masks as PNGs here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    names, masks = read_masks(args.data)
    print(f"read {len(masks)} masks from {args.data} in {time.perf_counter() - t0:.1f} s")
    art = np.array([interpolation_artefacts(m).sum() for m in masks])
    print(f"label-interpolation artefact pixels per mask: median {np.median(art):.0f}, "
          f"masks with any: {np.mean(art > 0) * 100:.1f} %")
    results = {}
    for preset in ("camus", "rl4seg"):
        cfg = getattr(AnatomyConfig, preset)()
        results[preset] = _table(f"raw files, preset {preset}", names, masks, cfg)
    cleaned = [remove_resize_artefacts(m) for m in masks]
    for preset in ("camus", "rl4seg"):
        cfg = getattr(AnatomyConfig, preset)()
        results[preset + "_cleaned"] = _table(f"artefacts removed, preset {preset}", names, cleaned, cfg)
    if args.png is not None:
        _save_pngs(args.png, names, masks, results["camus"]["reports"])
        _save_pngs(args.png / "cleaned", names, cleaned, results["camus_cleaned"]["reports"])
        print(f"\nPNGs of failing masks in {args.png}")
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
