"""The CAMUS-220 table of one or more presets from their evaluation folders (summary.json written by evaluate).

Usage: python results/camus220/table.py OUT [eval_target|eval_dev]   (OUT as given to run.sh; every preset it holds)
"""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
which = sys.argv[2] if len(sys.argv) > 2 else "eval_target"
NAMES = {"source": "source", "tent": "TENT", "pseudo-label": "pseudo-label", "styled-source": "styled-source",
         "rl_adapted": "**RL adapted**"}


def f(x, d=3):
    return "–" if x is None else f"{x:.{d}f}"


print("| preset | model | mean Dice | LV / MYO / LA | HD95 (px) | validity raw | validity delivered | EF MAE (points) "
      "| ΔDice vs source [95 % CI], Wilcoxon p |")
print("|---|---|---|---|---|---|---|---|---|")
for preset in ("blur", "lowgain", "shadow", "foreign", "beam"):
    path = out / preset / which / "summary.json"
    if not path.is_file():
        continue
    s = json.loads(path.read_text())
    pp = s.get("postprocessed", {}).get("models", {})
    for name, m in s["models"].items():
        d = m["dice"]
        paired = s["paired"].get(f"{name} vs source")
        delta = "" if paired is None else (f"{paired['dice_mean_diff']:+.4f} [{paired['ci95'][0]:+.4f}, "
                                           f"{paired['ci95'][1]:+.4f}], {paired['wilcoxon_p']:.1g}")
        dv = pp.get(name, {}).get("validity_rate")
        print(f"| {preset} | {NAMES.get(name, name)} | {f(d['mean'])} | {f(d['LV'])} / {f(d['MYO'])} / {f(d['LA'])} "
              f"| {f(m['hd95']['mean'], 1)} | {100 * m['validity_rate']:.1f} % | "
              f"{'–' if dv is None else f'{100 * dv:.1f} %'} | {f(m['ef_mae'], 1)} | {delta} |")
    for key, st in s["paired"].items():  # the --compare pairs run.sh asks for (RL against the styled-source baseline)
        name, _, ref = key.partition(" vs ")
        if ref != "source":
            print(f"| {preset} | {NAMES.get(name, name)} − {NAMES.get(ref, ref)} | | | | | | | "
                  f"{st['dice_mean_diff']:+.4f} [{st['ci95'][0]:+.4f}, {st['ci95'][1]:+.4f}], {st['wilcoxon_p']:.1g} |")
    r = s.get("reward")
    if r:
        print(f"| {preset} | reward network ({r['model']}'s masks) | AUROC {f(r['auroc'])}, ECE {f(r['ece'])} | "
              f"within {r['border_px']} px of a border: AUROC {f(r['border_auroc'])}, ECE {f(r['border_ece'])} "
              "| | | | | |")
        if r.get("confidence_border_auroc") is not None:
            print(f"| {preset} | {r['model']}'s own softmax confidence | AUROC {f(r['confidence_auroc'])} | "
                  f"within {r['border_px']} px of a border: AUROC {f(r['confidence_border_auroc'])} | | | | | |")
