"""Test-time augmentation as a label-free detector of wrong pixels near borders: the AUROC, over the pixels within
5 px of a predicted or true border (the band `rl-adapt evaluate --reward` scores), of the run's reward, of the model's
own max-softmax confidence, and of three signals of nine augmented predictions (identity, mirroring, gamma 0.7 / 1.4,
Gaussian smoothing, shifts of 3 px up / down / left / right, each shifted back): the mean probability of the predicted
class, the share of augmentations that disagree with the prediction, and the negative entropy of the mean softmax;
plus reward x those. Scored on MODEL_DIR's argmax masks of a labelled set (e.g. the dev patients).

Usage: python results/camus220/probe_border_tta.py RUN MODEL_DIR LABELLED_DIR   (prints one JSON line)
"""
import sys, json
from pathlib import Path
import numpy as np, torch
from scipy import ndimage as ndi
from sklearn.metrics import roc_auc_score
from rl_adapt.evaluation.inputs import load_labelled, load_model
from rl_adapt.evaluation.reliability import border_band, reward_in_geometry
from rl_adapt.engine.reward.network import RewardNet
torch.set_num_threads(1)
run, model_dir, data = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
model = load_model(model_dir); rnet = RewardNet.load(run / "reward_net.pt")
cases = load_labelled(data, progress=False)
def gamma(g):
    def f(x):
        lo, hi = np.percentile(x, [0.5, 99.5]); y = np.clip((x - lo) / (hi - lo + 1e-6), 0, 1)
        return (y ** g) * (hi - lo) + lo
    return f
def shift(dy, dx):
    return lambda x: ndi.shift(x.astype(np.float32), (dy, dx), order=1, mode="nearest"), (dy, dx)
augs = {"id": (lambda x: x, False, None), "mirror": (lambda x: x, True, None), "g0.7": (gamma(0.7), False, None),
        "g1.4": (gamma(1.4), False, None), "smooth": (lambda x: ndi.gaussian_filter(x.astype(np.float32), 1.0), False, None)}
for dy, dx in ((3, 0), (-3, 0), (0, 3), (0, -3)):
    f, s = shift(dy, dx); augs[f"s{dy},{dx}"] = (f, False, s)
S = {k: [] for k in ("reward", "conf", "tta_mean", "tta_dis", "tta_ent", "wrong")}
with torch.inference_mode():
    for c in cases:
        r, pred, cov, conf = reward_in_geometry(rnet, model, c)
        ps = []
        for k, (f, mir, s) in augs.items():
            lg = torch.softmax(torch.as_tensor(model.predict_logits(f(c.image.astype(np.float32)), c.spacing, mirror=mir)).float(), 0).numpy()
            if s is not None:
                lg = np.stack([ndi.shift(ch, (-s[0], -s[1]), order=1, mode="nearest") for ch in lg])
            ps.append(lg)
        ps = np.stack(ps); mean = ps.mean(0)
        band = cov & border_band(pred, c.label)
        onehot = np.eye(mean.shape[0])[pred].transpose(2, 0, 1)
        S["reward"].append(r[band]); S["conf"].append(conf[band])
        S["tta_mean"].append((mean * onehot).sum(0)[band])
        S["tta_dis"].append(-(ps.argmax(1) != pred[None]).mean(0)[band])
        S["tta_ent"].append((mean * np.log(mean + 1e-8)).sum(0)[band])
        S["wrong"].append(pred[band] != c.label[band])
w = np.concatenate(S["wrong"]); out = {"n": int(w.size), "wrong": float(w.mean())}
V = {k: np.concatenate(v) for k, v in S.items() if k != "wrong"}
for k, v in V.items(): out[k] = round(float(roc_auc_score(w, -v)), 4)
out["reward*tta_mean"] = round(float(roc_auc_score(w, -(V["reward"] * V["tta_mean"]))), 4)
out["reward*conf"] = round(float(roc_auc_score(w, -(V["reward"] * V["conf"]))), 4)
print(json.dumps(out))
