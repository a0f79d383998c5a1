"""How close each texture restyling brings the source images to a target site's look, by the mismatch `mode: auto`
ranks restylings with (`rl_adapt.training.styled_source.chosen_mode`: the scanner fit's objective over grey-level
quantiles, depth profile, spectra and angular dips), with the configs' restyling keys (depth and angular profiles
on). Label-free and without a scanner fit (the fitted scanner's own mismatch is in a run's log and state.json, or from
probe_mode_choice.py). Lower is closer; `source_as_is` is the untouched source images.

Usage: python results/camus220/probe_restyling_mismatch.py SOURCE_DATASET TARGET_DATASET   (prints one JSON line)
"""
import json
import sys

from rl_adapt.data.readers import read_dataset
from rl_adapt.scanner_fit import ScannerObjective
from rl_adapt.styling import MODES, sector_mask
from rl_adapt.training.styled_source import StyledSourceConfig, restyled_for_scoring

cfg = StyledSourceConfig(mode="auto", depth=True, angular=True)
source = [c for c in read_dataset(sys.argv[1], with_labels=True, progress=False) if c.label is not None]
target = read_dataset(sys.argv[2], with_labels=False, progress=False)
objective = ScannerObjective([c.image for c in source], [c.image for c in target], cfg.fit, [c.label for c in source])
scores = {"source_as_is": objective.score_images(list(objective.source), [sector_mask(i) for i in objective.source])}
for mode in MODES:
    scores[mode] = objective.score_images(*restyled_for_scoring(objective.source, source, target, cfg, mode))
print(json.dumps({"target": sys.argv[2], **{k: round(float(v), 3) for k, v in scores.items()}}))
