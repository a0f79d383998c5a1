"""Is the scanner fit limited by its search or by its objective? Scores, with the fit's own objective
(`rl_adapt.scanner_fit.ScannerObjective`), the scanner a run fitted, the preset that truly made the target site, and
that true preset snapped to the search grid (`SEARCH`; the fields the fit does not search at the fit's start values),
each on the fit's subset of source images (seed 0) and on two other seeded subsets (seeds 1 and 2: source images and
speckle the fit never saw). Only for the sites made with the project's own B-mode model (target-blur, target-lowgain,
target-shadow), whose true scanner is known; no label of the target is read.

Usage: python results/camus220/probe_fit_vs_true_scanner.py SOURCE_DATASET TARGET_DATASET RUN PRESET
  e.g. ... Dataset520_Camus220Source Dataset523_Camus220Target_blur RUN target-blur     (one JSON line per seed)
"""
import json
import sys
from dataclasses import fields, replace

import numpy as np

from rl_adapt.data.readers import read_dataset
from rl_adapt.scanner_fit import SEARCH, ScannerFitConfig, ScannerObjective, _get, _with_value
from rl_adapt.synth.vendors import VENDORS, VendorPreset


def fitted_preset(run: str) -> VendorPreset:
    """The scanner a run fitted (its state.json record of the first restyling draw)."""
    record = json.load(open(f"{run}/state.json"))["completed"]["draw0/styled_source"]["scanner"]["preset"]
    names = {f.name for f in fields(VendorPreset)}
    return VendorPreset(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names})


def snapped(true: VendorPreset, fit: VendorPreset) -> VendorPreset:
    """``true`` with every searched field moved to its nearest grid value, the other fields at the fit's start."""
    out = replace(VENDORS["source"], name="fitted", depth_mm=fit.depth_mm, sector_deg=fit.sector_deg)
    for key, grid in SEARCH.items():
        out = _with_value(out, key, grid[int(np.argmin(np.abs(np.asarray(grid) - _get(true, key))))])
    return out


def main(source_dir: str, target_dir: str, run: str, preset: str) -> None:
    source = [c for c in read_dataset(source_dir, with_labels=True, progress=False) if c.label is not None]
    target = read_dataset(target_dir, with_labels=False, progress=False)
    fit = fitted_preset(run)
    true = replace(VENDORS[preset], name="fitted")
    print(json.dumps({"field": "true / snapped / fitted",
                      **{k: [round(_get(p, k), 3) for p in (true, snapped(true, fit), fit)] for k in SEARCH}}))
    for seed in (0, 1, 2):
        objective = ScannerObjective([c.image for c in source], [c.image for c in target], ScannerFitConfig(seed=seed),
                                     [c.label for c in source])
        scores = {"fitted": objective(fit), "true": objective(true), "true_snapped": objective(snapped(true, fit))}
        print(json.dumps({"seed": seed, **{k: round(float(v), 3) for k, v in scores.items()}}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
