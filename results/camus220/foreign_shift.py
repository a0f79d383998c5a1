"""A target scanner outside the engine's B-mode model (`rl_adapt.synth.vendors`), to test restyling on a look the
fitted scanner model cannot reproduce: speckle-reduction filtering (median 9 px, then Gaussian 1 px), edge
enhancement (unsharp mask, 2.5 px, 0.9), an S-shaped grey map (centre 0.45, slope 10), near-field haze (0.8 of full
scale, falling off over 35 % of the depth, amplitude drawn per image) with reverberation bands, and 6-bit grey levels.
Labels are unchanged (no geometric change). Its strength was set so that the 128 px source model loses about as much
as under blur on the dev patients (0.897 -> 0.838), before any adaptation was run on it.

A second scanner outside the model (`beam`, written after every run on the first one, to check that the committed
configs were not fitted to one look): a beam that widens with depth (lateral Gaussian blur, sigma 0.5 px at the top to
4.5 px at the bottom of the image), coarse speckle elongated across the beam (multiplicative, 0.8 x 2.5 px grain),
no time-gain compensation (intensity falls as exp(-1.3 depth)), a grey map that lifts the dark (gamma 0.55) with
clutter in the blood pools, and 7-bit grey levels. Its strength was set, before any adaptation ran on it, so that the
64 px source model loses about as much on the dev patients as on the issue's hidden shift (about 0.09 Dice).

Usage: python results/camus220/foreign_shift.py IN_DATASET OUT_DATASET [foreign|beam]
       (nnU-Net raw folders; OUT must not exist; the look defaults to foreign)
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from rl_adapt.io_utils import atomic_dir

MEDIAN_PX, CENTRE, SLOPE, HAZE, HAZE_DEPTH, REVERB = 9, 0.45, 10.0, 0.8, 0.35, 0.6


def foreign_look(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint8 B-mode image -> (H, W) uint8 through the foreign scanner; zero outside the fan."""
    x = image.astype(np.float32) / 255.0
    fan = ndi.binary_fill_holes(ndi.binary_closing(image > 2, iterations=3))
    y = ndi.gaussian_filter(ndi.median_filter(x, size=MEDIAN_PX), 1.0)
    y = np.clip(y + 0.9 * (y - ndi.gaussian_filter(y, 2.5)), 0, 1)
    s = lambda v: 1 / (1 + np.exp(-(v - CENTRE) * SLOPE))  # noqa: E731
    y = (s(y) - s(0)) / (s(1) - s(0))
    h, w = image.shape
    depth = np.arange(h)[:, None] / h
    haze = HAZE * np.exp(-depth / HAZE_DEPTH) * (0.8 + 0.4 * rng.random())
    period = 9 + 4 * rng.random()
    bands = REVERB * np.exp(-depth / 0.25) * (0.5 + 0.5 * np.sin(2 * np.pi * depth * h / period))
    bands = bands * ndi.gaussian_filter(rng.random((h, w)), (1, 6)) * 2
    y = np.round(np.clip(y + haze + bands, 0, 1) * 63) / 63
    return np.where(fan, y * 255, 0).astype(np.uint8)


BEAM_SIGMA, SPECKLE, ATTENUATION, GAMMA, CLUTTER = (0.5, 4.5), 0.3, 1.3, 0.55, 0.15


def beam_look(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint8 B-mode image -> (H, W) uint8 through the `beam` scanner; zero outside the fan."""
    x = image.astype(np.float32) / 255.0
    fan = ndi.binary_fill_holes(ndi.binary_closing(image > 2, iterations=3))
    h, w = image.shape
    depth = np.arange(h, dtype=np.float32)[:, None] / h
    sigmas = np.linspace(*BEAM_SIGMA, 9)
    blurred = np.stack([ndi.gaussian_filter1d(x, s, axis=1) for s in sigmas])  # (9, H, W)
    pos = depth[:, 0] * (len(sigmas) - 1)  # each row's place between the two nearest blurs
    lo = np.floor(pos).astype(int).clip(0, len(sigmas) - 2)
    frac = (pos - lo)[:, None]
    rows = np.arange(h)
    y = blurred[lo, rows] * (1 - frac) + blurred[lo + 1, rows] * frac
    grain = ndi.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), (0.8, 2.5))
    y = np.clip(y * (1 + SPECKLE * grain / grain.std()), 0, 1)
    y = y * np.exp(-ATTENUATION * depth) / np.exp(-ATTENUATION * 0.25)  # untouched a quarter down, darker below
    y = np.clip(y, 0, 1) ** GAMMA
    y = y + CLUTTER * ndi.gaussian_filter(rng.random((h, w)).astype(np.float32), 3) * (1 - y)
    y = np.round(np.clip(y, 0, 1) * 127) / 127
    return np.where(fan, y * 255, 0).astype(np.uint8)


LOOKS = {"foreign": foreign_look, "beam": beam_look}


def main(src: Path, out: Path, look: str = "foreign") -> None:
    if out.exists():
        sys.exit(f"{out}: exists; choose a new folder")
    if look not in LOOKS:
        sys.exit(f"{look}: not a look here; choose one of {', '.join(LOOKS)}")
    with atomic_dir(out) as tmp:  # written next to OUT and renamed at the end: no partial dataset
        (tmp / "imagesTr").mkdir()
        if (src / "labelsTr").is_dir():
            shutil.copytree(src / "labelsTr", tmp / "labelsTr")
        meta = json.loads((src / "dataset.json").read_text())
        meta["name"] = out.name.split("_", 1)[-1]
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
        if (src / "rl_adapt_meta.json").is_file():
            shutil.copy(src / "rl_adapt_meta.json", tmp / "rl_adapt_meta.json")
        for i, path in enumerate(sorted((src / "imagesTr").glob("*.nii.gz"))):
            im = sitk.ReadImage(str(path))
            new = sitk.GetImageFromArray(LOOKS[look](sitk.GetArrayFromImage(im), np.random.default_rng(i)))
            new.CopyInformation(im)
            sitk.WriteImage(new, str(tmp / "imagesTr" / path.name), useCompression=True)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__.rsplit("Usage:", 1)[1])
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:])
