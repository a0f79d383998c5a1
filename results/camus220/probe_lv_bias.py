"""Where an EF error comes from: the signed EF and volume errors per model of an evaluation, and the signed distance
of each model's predicted LV border from the true one at end-diastole and end-systole.

    python results/camus220/probe_lv_bias.py ef EVAL_DIR
        EVAL_DIR: an `rl-adapt evaluate` folder; per model (raw masks): EF MAE, mean signed EF error (predicted -
        true, points), mean signed EDV and ESV errors (%), and the paired |EF error| difference to the first model
        (bootstrap over patients, 95 % interval).
    python results/camus220/probe_lv_bias.py border DATA PRED_DIR [PRED_DIR ...]
        DATA: the labelled dataset; PRED_DIR: `rl-adapt predict --postprocessing none` masks of its images. Per
        phase: mean LV cavity area error (%), and the mean signed distance (px) of the predicted border pixels from
        the true region (+: outside it), for the LV cavity and the epicardium (LV + MYO).
"""
import csv
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from rl_adapt.data.readers import read_dataset, read_label


def _float(x: str) -> float:
    try:
        return float(x)
    except ValueError:
        return float("nan")


def ef_errors(eval_dir: Path, n_boot: int = 2000) -> None:
    rows = list(csv.DictReader(open(eval_dir / "per_patient.csv", encoding="utf-8")))
    models = list(dict.fromkeys(r["model"] for r in rows))
    keys = ("EF_pred", "EF_ref", "EDV_pred", "EDV_ref", "ESV_pred", "ESV_ref")
    per = {m: {k: np.array([_float(r[k]) for r in rows if r["model"] == m]) for k in keys} for m in models}
    rng = np.random.default_rng(0)
    for m in models:
        d = per[m]
        e = d["EF_pred"] - d["EF_ref"]
        edv = 100 * (d["EDV_pred"] - d["EDV_ref"]) / d["EDV_ref"]
        esv = 100 * (d["ESV_pred"] - d["ESV_ref"]) / d["ESV_ref"]
        line = (f"{m:16s} n={np.isfinite(e).sum():3d}  EF MAE {np.nanmean(np.abs(e)):5.2f}  bias {np.nanmean(e):+5.2f}"
                f"  EDV {np.nanmean(edv):+5.1f} %  ESV {np.nanmean(esv):+5.1f} %")
        if m != models[0]:
            ref = per[models[0]]
            diff = np.abs(e) - np.abs(ref["EF_pred"] - ref["EF_ref"])
            diff = diff[np.isfinite(diff)]
            boot = [rng.choice(diff, diff.size).mean() for _ in range(n_boot)]
            line += (f"  |EF err| - {models[0]}: {diff.mean():+.2f} "
                     f"[{np.percentile(boot, 2.5):+.2f}, {np.percentile(boot, 97.5):+.2f}]")
        print(line)


def _signed_distance(region: np.ndarray) -> np.ndarray:
    return ndi.distance_transform_edt(~region) - ndi.distance_transform_edt(region)


def border_bias(data: Path, preds: list[Path]) -> None:
    cases = read_dataset(data, with_labels=True, progress=False)
    for pred in preds:
        out: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for c in cases:
            mask, _ = read_label(pred / f"{c.name}.nii.gz")
            for labels, name in (((1,), "LV"), ((1, 2), "epi")):
                true, got = np.isin(c.label, labels), np.isin(mask, labels)
                if not true.any() or not got.any():
                    continue
                edge = got & ~ndi.binary_erosion(got)
                out.setdefault((c.meta.get("phase", "?"), name), []).append(
                    (100 * (got.sum() - true.sum()) / true.sum(), float(_signed_distance(true)[edge].mean())))
        print(pred.name)
        for (phase, name), vals in sorted(out.items()):
            a = np.array(vals)
            print(f"  {phase} {name:3s} area error {a[:, 0].mean():+6.1f} %  signed border distance "
                  f"{a[:, 1].mean():+.2f} px  (n={len(a)})")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "ef":
        ef_errors(Path(sys.argv[2]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "border":
        border_bias(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
    else:
        sys.exit(__doc__)
