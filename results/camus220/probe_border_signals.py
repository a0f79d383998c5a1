"""How well label-free signals find the wrong pixels near borders: the AUROC, over the pixels within 5 px of a
predicted or true border (the band `rl-adapt evaluate --reward` scores), of the run's reward, of the model's own
max-softmax confidence, of the distance to the predicted border, and of reward x confidence, each as a detector of
wrong pixels on a labelled set (e.g. the dev patients).

Usage: python results/camus220/probe_border_signals.py RUN MODEL_DIR LABELLED_DIR   (prints one JSON line)
"""
import sys, json
from pathlib import Path
import numpy as np, torch
from scipy.ndimage import distance_transform_edt
from sklearn.metrics import roc_auc_score
from rl_adapt.evaluation.inputs import load_labelled, load_model
from rl_adapt.evaluation.reliability import border_band, label_edges, reward_in_geometry
from rl_adapt.engine.reward.network import RewardNet
torch.set_num_threads(1)
run, model_dir, data = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
model = load_model(model_dir)
rnet = RewardNet.load(run / "reward_net.pt")
cases = load_labelled(data, progress=False)
S = {"reward": [], "conf": [], "dist": [], "wrong": []}
for c in cases:
    r, pred, cov, _ = reward_in_geometry(rnet, model, c)
    logits = model.predict_logits(c.image, c.spacing)
    p = torch.softmax(torch.as_tensor(logits).float(), 0).numpy()
    conf = p.max(0)
    dist = distance_transform_edt(~label_edges(pred))
    band = cov & border_band(pred, c.label)
    S["reward"].append(r[band]); S["conf"].append(conf[band]); S["dist"].append(dist[band])
    S["wrong"].append(pred[band] != c.label[band])
w = np.concatenate(S["wrong"])
out = {"n": int(w.size), "wrong_share": float(w.mean())}
for k in ("reward", "conf", "dist"):
    v = np.concatenate(S[k])
    out[k] = float(roc_auc_score(w, -v))
r = np.concatenate(S["reward"]); cf = np.concatenate(S["conf"])
out["reward*conf"] = float(roc_auc_score(w, -(r * cf)))
print(json.dumps(out))
