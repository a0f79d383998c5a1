"""Where the reward's border knowledge is lost: its border-band AUROC on the held-out restyled source pairs of a run
(the data it was taught on, but images it did not see), on the adapted policy's own masks there, against the true
labels. Compare with `rl-adapt evaluate --reward RUN --reward-model rl_adapted` on real target images.

Usage: python results/camus220/probe_border_source_pairs.py RUN   (prints one JSON line)
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from rl_adapt.engine.reward.network import RewardNet
from rl_adapt.evaluation.inputs import load_model
from rl_adapt.evaluation.reliability import border_band
from rl_adapt.training.styled_source import StyledPairs

torch.set_num_threads(1)
run = Path(sys.argv[1])
pairs = StyledPairs.load(run / "styled_source.npz")
model = load_model(next((run / "model").glob("*/*/")))
reward = RewardNet.load(run / "reward_net.pt")
out = {}
for name, keep in (("held_out_styled", pairs.held_out & pairs.styled), ("held_out_plain", pairs.held_out & ~pairs.styled)):
    idx = torch.as_tensor(np.flatnonzero(keep))
    images, labels = pairs.images[idx], pairs.labels[idx].numpy()
    with torch.no_grad():
        logits = model.network(images)
        logits = logits[0] if isinstance(logits, (list, tuple)) else logits
        actions = logits.argmax(1)
        r = reward.score(images, actions).numpy()
    pred = actions.numpy()
    band = np.stack([border_band(p, y) for p, y in zip(pred, labels)])
    wrong = pred != labels
    out[name] = {"n_images": int(len(idx)), "wrong_share_band": float(wrong[band].mean()),
                 "auroc_all": float(roc_auc_score(wrong.ravel(), -r.ravel())),
                 "auroc_border": float(roc_auc_score(wrong[band], -r[band]))}
print(json.dumps(out))
