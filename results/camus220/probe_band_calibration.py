"""Can the reward be recalibrated near borders without target labels? A logistic head on the reward's logit, the
distance to the predicted border (bins, patch pixels), their products and the predicted class (and optionally the
policy's own max-softmax confidence), fitted on the run's held-out restyled source pairs (true labels), then scored
on a labelled target-looking set (the dev patients) everywhere and in the border band `rl-adapt evaluate --reward`
uses, beside the reward as it is.

Usage: python results/camus220/probe_band_calibration.py RUN LABELLED_DIR   (one JSON line)
"""
import sys, json
from pathlib import Path
import numpy as np, torch
from scipy.ndimage import distance_transform_edt
from sklearn.linear_model import LogisticRegression
from rl_adapt.engine.reward.network import RewardNet
from rl_adapt.evaluation.inputs import load_model, load_labelled
from rl_adapt.evaluation.reliability import border_band, label_edges, _Reliability
from rl_adapt.training.styled_source import StyledPairs
torch.set_num_threads(1)
run, data = Path(sys.argv[1]), Path(sys.argv[2])
pairs = StyledPairs.load(run / "styled_source.npz")
model = load_model(next((run / "model").glob("*/*/")))
reward = RewardNet.load(run / "reward_net.pt")
EDGES = np.array([0.5, 1.01, 1.5, 2.01, 2.9, 4.01, 6.0])

def feats(images):
    """per-pixel features (N, P0, P1, F) and actions, at patch geometry"""
    with torch.no_grad():
        lg = model.network(images); lg = lg[0] if isinstance(lg, (list, tuple)) else lg
        prob = torch.softmax(lg.float(), 1)
        act = lg.argmax(1)
        p = reward.score(images, act).double().clamp(1e-5, 1 - 1e-5).numpy()
    conf = prob.max(1).values.double().clamp(1e-5, 1 - 1e-5).numpy()
    act = act.numpy()
    z = np.log(p / (1 - p)); zc = np.log(conf / (1 - conf))
    d = np.stack([distance_transform_edt(~label_edges(a)) for a in act])
    db = np.searchsorted(EDGES, d)  # 0..7
    D = np.eye(len(EDGES) + 1)[db]
    C = np.eye(4)[act]
    F_ = np.concatenate([z[..., None], z[..., None] * D, D, C], -1)
    Fc = np.concatenate([F_, zc[..., None], zc[..., None] * D], -1)
    return F_, Fc, act, p

idx = np.flatnonzero(pairs.held_out)
rng = np.random.default_rng(0)
X, Xc, Y = [], [], []
for s in range(0, len(idx), 16):
    b = torch.as_tensor(idx[s:s + 16])
    F_, Fc, act, _ = feats(pairs.images[b])
    right = act == pairs.labels[b].numpy()
    sel = rng.random(right.shape) < 0.1
    X.append(F_[sel]); Xc.append(Fc[sel]); Y.append(right[sel])
X, Xc, Y = np.concatenate(X), np.concatenate(Xc), np.concatenate(Y)
head = LogisticRegression(max_iter=500, C=10.0).fit(X, Y)
headc = LogisticRegression(max_iter=500, C=10.0).fit(Xc, Y)
res = {k: [_Reliability(10, 10**9, np.random.default_rng(1)), _Reliability(10, 10**9, np.random.default_rng(2))] for k in ("raw", "head", "head+conf")}
for c in load_labelled(data, progress=False):
    patch, props = model.to_patch(c.image, c.spacing)
    F_, Fc, act, p = feats(patch[None].float())
    maps = {"raw": p[0], "head": head.predict_proba(F_[0].reshape(-1, F_.shape[-1]))[:, 1].reshape(p[0].shape),
            "head+conf": headc.predict_proba(Fc[0].reshape(-1, Fc.shape[-1]))[:, 1].reshape(p[0].shape)}
    pred = np.asarray(model.from_patch(act[0], props), dtype=np.uint8)
    right = pred == c.label
    for k, m in maps.items():
        st = np.zeros((model.num_classes,) + m.shape, np.float32); st[0] = m; st[1] = 1
        back = model.from_patch(st, props); cov = back[1] > 0.5; r = np.clip(back[0], 0, 1)
        band = cov & border_band(pred, c.label)
        res[k][0].add(r[cov], right[cov]); res[k][1].add(r[band], right[band])
out = {}
for k, (a, b) in res.items():
    ra, rb = a.result(), b.result()
    out[k] = {"auroc": round(ra["auroc"], 3), "ece": round(ra["ece"], 3), "border_auroc": round(rb["auroc"], 3), "border_ece": round(rb["ece"], 3)}
print(json.dumps(out))
