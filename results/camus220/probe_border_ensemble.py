"""Would a committee find the wrong border pixels? The border-band AUROC (the band `rl-adapt evaluate --reward`
scores) of the RL model's predicted class's probability under: the RL model itself, its reward, the styled-source
model, and the mean over RL, styled-source, TENT, pseudo-label and source models (all label-free), against the true
labels of a labelled set (the dev patients).

Usage: python results/camus220/probe_border_ensemble.py PRESET_DIR SOURCE_MODEL_DIR LABELLED_DIR   (one JSON line)
PRESET_DIR is a run.sh preset folder (rl/, styled-source/, tent/, pseudo-label/).
"""
import sys, json, glob
from pathlib import Path
import numpy as np, torch
from sklearn.metrics import roc_auc_score
from rl_adapt.evaluation.inputs import load_model, load_labelled
from rl_adapt.evaluation.reliability import border_band, reward_in_geometry
from rl_adapt.engine.reward.network import RewardNet
torch.set_num_threads(1)
P, source_dir, data = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
d = lambda s: Path(glob.glob(str(s) + "/*/*/")[0])
rl = load_model(d(P / "rl/model")); rnet = RewardNet.load(P / "rl/reward_net.pt")
others = {k: load_model(d(P / k)) for k in ("styled-source", "tent", "pseudo-label")}
others["source"] = load_model(source_dir)
S = {k: [] for k in ["rl_conf", "reward", "ens_all", "ens_others", "styled", "ens_all*reward"]}; W = []
for c in load_labelled(data, progress=False):
    r, pred, cov = reward_in_geometry(rnet, rl, c)
    probs = {"rl": torch.softmax(torch.as_tensor(rl.predict_logits(c.image, c.spacing)).float(), 0).numpy()}
    for k, m in others.items():
        probs[k] = torch.softmax(torch.as_tensor(m.predict_logits(c.image, c.spacing)).float(), 0).numpy()
    band = cov & border_band(pred, c.label)
    pick = lambda p: np.take_along_axis(p, pred[None].astype(np.int64), 0)[0]
    ens = np.mean([pick(p) for p in probs.values()], 0)
    enso = np.mean([pick(probs[k]) for k in others], 0)
    S["rl_conf"].append(pick(probs["rl"])[band]); S["reward"].append(r[band]); S["ens_all"].append(ens[band])
    S["ens_others"].append(enso[band]); S["styled"].append(pick(probs["styled-source"])[band]); S["ens_all*reward"].append((ens * r)[band])
    W.append(pred[band] != c.label[band])
w = np.concatenate(W)
print(json.dumps({k: round(float(roc_auc_score(w, -np.concatenate(v))), 3) for k, v in S.items()} | {"wrong": round(float(w.mean()), 3)}))
