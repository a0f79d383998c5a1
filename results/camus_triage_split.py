"""Expert masks chosen by `rl-adapt triage` vs at random, on one fixed held-out test set (results/camus_shift.md).

Splits the patients of a labelled, shifted CAMUS validation dataset (made by `rl-adapt shift`) with a seed into
TEST patients (a labelled nnU-Net raw dataset, never used for training) and a POOL; from the pool, the expert
patients are either the first N of `rl-adapt triage`'s ranking (pool patients only) or N drawn at random. The
true label maps of the expert patients play the cardiologist's corrected masks (`rl-adapt adapt --expert`).

usage: camus_triage_split.py DATASET TRIAGE_DIR OUT [--test 25] [--experts 10] [--seed 0] [--random-seeds S ...]
writes OUT/test (dataset), OUT/expert_triage/ and OUT/expert_random/ (masks), OUT/split.json
"""
import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("dataset", type=Path)
ap.add_argument("triage", type=Path, help="output folder of rl-adapt triage on DATASET's images")
ap.add_argument("out", type=Path)
ap.add_argument("--test", type=int, default=25)
ap.add_argument("--experts", type=int, default=10)
ap.add_argument("--seed", type=int, default=0, help="test/pool split and, by default, the random experts")
ap.add_argument("--random-seeds", type=int, nargs="*", default=[],
                help="also write OUT/expert_random<S>/ for each seed S (other random draws from the same pool)")
args = ap.parse_args()

src = args.dataset
cases = sorted(p.name[: -len(".nii.gz")] for p in (src / "labelsTr").glob("*.nii.gz"))
patients = sorted({c.split("_")[0] for c in cases})
rng = np.random.default_rng(args.seed)
test = set(rng.choice(patients, args.test, replace=False).tolist())
pool = [p for p in patients if p not in test]
ranked = [r["patient"] for r in csv.DictReader(open(args.triage / "patients.csv"))]
if set(ranked) != set(patients):
    raise SystemExit(f"{args.triage}: its patients are not {src}'s")
experts = {"triage": [p for p in ranked if p in pool][: args.experts],
           "random": sorted(rng.choice(pool, args.experts, replace=False).tolist())}
for s in args.random_seeds:
    experts[f"random{s}"] = sorted(np.random.default_rng(s).choice(pool, args.experts, replace=False).tolist())

args.out.mkdir(parents=True, exist_ok=False)
for name, chosen in experts.items():
    folder = args.out / f"expert_{name}"
    folder.mkdir()
    for c in cases:
        if c.split("_")[0] in chosen:
            shutil.copy(src / "labelsTr" / f"{c}.nii.gz", folder / f"{c}.nii.gz")
t = args.out / "test"
(t / "imagesTr").mkdir(parents=True)
(t / "labelsTr").mkdir()
kept = [c for c in cases if c.split("_")[0] in test]
for c in kept:
    shutil.copy(src / "imagesTr" / f"{c}_0000.nii.gz", t / "imagesTr" / f"{c}_0000.nii.gz")
    shutil.copy(src / "labelsTr" / f"{c}.nii.gz", t / "labelsTr" / f"{c}.nii.gz")
dj = json.loads((src / "dataset.json").read_text())
dj["numTraining"] = len(kept)
dj["name"] = dj.get("name", src.name) + "_test"
(t / "dataset.json").write_text(json.dumps(dj, indent=2))
meta = json.loads((src / "rl_adapt_meta.json").read_text())
mc = meta["cases"]
if isinstance(mc, dict):
    meta["cases"] = {k: v for k, v in mc.items() if k.split("_")[0] in test}
else:
    meta["cases"] = [v for v in mc if str(v.get("name", v.get("patient", ""))).split("_")[0] in test]
meta["dataset_name"] = t.name
(t / "rl_adapt_meta.json").write_text(json.dumps(meta, indent=1))
split = {"test": sorted(test), "pool": pool, **{f"expert_{k}": v for k, v in experts.items()}}
(args.out / "split.json").write_text(json.dumps(split, indent=1))
print(json.dumps({k: (len(v) if k in ("test", "pool") else v) for k, v in split.items()}))
