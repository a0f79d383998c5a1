"""Probe (not part of the engine): choose the CAMUS expert-run setting on a dev subset, report it on the rest.

The real-CAMUS expert settings of results/camus_shift.md were compared on the same 40 held-out patients they are
reported on. This re-reads those evaluations (``rl-adapt evaluate`` folders, one per setting, all on the same
Test40 set) and splits the 40 patients, with a seed, into DEV (chooses the setting by mean Dice) and TEST (reports
it): no new run, no label seen twice.

usage: camus_dev_test_reselect.py [--dev N] [--seed S] [--raw] SHIFT=NAME:EVAL_DIR [SHIFT=NAME:EVAL_DIR ...]
  e.g. lowgain=expert+CE:/tmp/camus/eval_toesup_lowgain lowgain=expert:/tmp/camus/eval_toe_lowgain ...
Scores are the delivered model's (EVAL_DIR/postprocessed/per_image.csv: the postprocessing stored with each model
applied to every model) unless --raw.
"""
import argparse
import collections

import numpy as np

from rl_adapt.evaluation.scoring import paired_stats
from rl_adapt.io_utils import read_csv

ap = argparse.ArgumentParser()
ap.add_argument("runs", nargs="+")
ap.add_argument("--dev", type=int, default=10, help="dev patients drawn from the held-out ones")
ap.add_argument("--seed", type=int, default=1)
ap.add_argument("--raw", action="store_true", help="raw network outputs instead of the delivered ones")
args = ap.parse_args()

by_shift = collections.defaultdict(list)
for spec in args.runs:
    shift, rest = spec.split("=", 1)
    name, path = rest.split(":", 1)
    by_shift[shift].append((name, path))


def table(path: str) -> dict[str, dict[str, list]]:
    """model -> {"patient", "dice", "valid"} per image, in file order."""
    f = f"{path}/per_image.csv" if args.raw else f"{path}/postprocessed/per_image.csv"
    out: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in read_csv(f):
        m = out[r["model"]]
        m["case"].append(r["case"]); m["patient"].append(r["patient"])
        m["dice"].append(r["mean_dice"]); m["valid"].append(r["valid"])
    return out


for shift, runs in by_shift.items():
    tabs = {name: table(path) for name, path in runs}
    first = next(iter(tabs.values()))["source"]
    patients = sorted(set(first["patient"]))
    rng = np.random.default_rng(args.seed)
    dev = set(rng.choice(patients, size=args.dev, replace=False).tolist())
    print(f"== {shift}: {len(patients)} patients, dev {args.dev} (seed {args.seed}), test {len(patients) - args.dev}"
          f" ({'raw' if args.raw else 'delivered'})")
    scores = {}
    for name, tab in tabs.items():
        src, ad = tab["source"], tab["rl_adapted"]
        if src["case"] != first["case"] or ad["case"] != first["case"]:
            raise SystemExit(f"{name}: its evaluation does not hold the same images in the same order")
        is_dev = np.array([p in dev for p in src["patient"]])
        d_src, d_ad = np.array(src["dice"]), np.array(ad["dice"])
        scores[name] = (d_ad[is_dev].mean(), is_dev, src, ad)
        print(f"   {name:14s} dev Dice {d_ad[is_dev].mean():.4f} (source {d_src[is_dev].mean():.4f})")
    best = max(scores, key=lambda k: scores[k][0])
    _, is_dev, src, ad = scores[best]
    t = ~is_dev
    s_d, a_d = np.array(src["dice"])[t], np.array(ad["dice"])[t]
    st = paired_stats(s_d, a_d)
    print(f"   chosen on dev: {best}; TEST {int(t.sum())} images: Dice {s_d.mean():.4f} -> {a_d.mean():.4f}, "
          f"dDice {st['dice_mean_diff']:+.4f} [{st['ci95'][0]:+.4f}, {st['ci95'][1]:+.4f}], p {st['wilcoxon_p']:.1g}; "
          f"validity {np.mean(np.array(src['valid'])[t]):.1%} -> {np.mean(np.array(ad['valid'])[t]):.1%}")
