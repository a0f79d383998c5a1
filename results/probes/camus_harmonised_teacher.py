"""Probe (not part of the engine): does the source model segment a shifted target image better after its intensities
are harmonised to the source images' statistics (label-free)? If so, its predictions on harmonised images are a
candidate automatic correction. usage: DATA_SRC MODEL DATA_TGT [N]

Harmonisations (each image on its own, background = pixels outside the imaging sector, value 0):
  hist   global histogram matching of the in-sector pixels to the pooled source in-sector histogram;
  rows   per image row (depth), scale the in-sector pixels so the row mean follows the source's mean depth profile,
         then global histogram matching.
"""
import sys
import numpy as np, torch
torch.set_num_threads(1)
from rl_adapt.evaluation.inputs import load_labelled
from rl_adapt.policies.nnunet import load_model_folder
from rl_adapt.measures.metrics import mean_dice
from rl_adapt.measures.anatomy import is_valid

src = load_labelled(sys.argv[1])
model = load_model_folder(sys.argv[2], device="cpu")
cases = load_labelled(sys.argv[3])
n = int(sys.argv[4]) if len(sys.argv) > 4 else len(cases)
cases = cases[:n]
H = src[0].image.shape[0]
pool = np.concatenate([c.image[c.image > 0].ravel() for c in src[::4]])
q = np.linspace(0, 1, 1001)
src_q = np.quantile(pool, q)
prof = np.zeros(H); cnt = np.zeros(H)
for c in src[::4]:
    m = c.image > 0
    prof += np.where(m, c.image, 0).sum(1); cnt += m.sum(1)
src_prof = prof / np.maximum(cnt, 1)


def hist(img):
    m = img > 0
    out = img.astype(np.float32).copy()
    v = img[m].astype(np.float64)
    ranks = (np.argsort(np.argsort(v, kind="stable"), kind="stable") + 0.5) / v.size
    out[m] = np.interp(ranks, q, src_q)
    return out


def rows(img):
    m = img > 0
    x = img.astype(np.float64)
    rm = np.where(m, x, 0).sum(1) / np.maximum(m.sum(1), 1)
    g = np.where((m.sum(1) > 5) & (rm > 1e-3), src_prof / np.maximum(rm, 1e-3), 1.0)
    g = np.convolve(np.pad(g, 5, mode="edge"), np.ones(11) / 11, mode="valid")
    return hist(np.where(m, x * g[:, None], 0))


res = {}
for name, f in (("raw", lambda x: x), ("hist", hist), ("rows", rows)):
    with torch.inference_mode():
        preds = [model.predict(f(c.image), c.spacing) for c in cases]
    d = np.array([mean_dice(p, c.label) for p, c in zip(preds, cases)])
    v = np.mean([is_valid(p) for p in preds])
    res[name] = d
    extra = "" if name == "raw" else f"  dDice {np.mean(d - res['raw']):+.4f}"
    print(f"{sys.argv[3].rstrip('/').split('/')[-1]} {name:5s} Dice {d.mean():.4f} valid {v:.1%}{extra}", flush=True)
