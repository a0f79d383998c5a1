"""What `mode: auto` chooses for a target site, from a finished run's recorded scanner fit (the fit is deterministic,
so it is read back instead of being redone): the fit's mismatch with the target's image statistics against that of
`degrade` restyling (depth and angular profiles), as `rl_adapt.training.styled_source.chosen_mode` computes it.

Usage: python results/camus220/probe_mode_choice.py RUN SOURCE_DATASET TARGET_DATASET   (prints one JSON line)
RUN: an adaptation run restyled with mode scanner or auto (its state.json records the fit).
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

from rl_adapt.config import from_dict
from rl_adapt.data.readers import read_dataset
from rl_adapt.training.styled_source import StyledSourceConfig, chosen_mode, remember_restyling

run, source_dir, target_dir = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
state = json.loads((run / "state.json").read_text())
done = state["completed"]
record = next(v["scanner"] for k, v in done.items() if k.endswith("styled_source") and "scanner" in v)
cfg = from_dict(StyledSourceConfig, state["settings"]["cfg"]["source_teacher"]["pairs"])
cfg = replace(cfg, mode="auto", depth=True, angular=True)
source = read_dataset(source_dir, with_labels=True)
source = [c for c in source if c.label is not None]
target = read_dataset(target_dir, with_labels=False)
remember_restyling(source, target, cfg, {"scanner": record})  # the recorded fit, not a new one
print(json.dumps({"run": str(run), "target": target_dir, **chosen_mode(source, target, cfg)}))
