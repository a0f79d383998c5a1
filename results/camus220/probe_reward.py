"""The quickest test of a reward (before any PPO): train the reward network on one adaptation run's data with a
choice of teachers and sizes, then score it against the true labels of a labelled set (e.g. the dev patients)
on a given model's outputs: AUROC and ECE everywhere and within 5 px of a border.

Usage: python results/camus220/probe_reward.py RUN MODEL_DIR LABELLED_DIR [--features 8] [--depth 3] [--steps 400]
       [--reward-images 256] [--seed 0] [--extra-model DIR ...] [--border-weight 1.0] [--border-px 3]
RUN is an adaptation run folder with the source teacher's styled_source.npz; MODEL_DIR the policy whose masks the
reward learns and is scored on (e.g. the run's warm start exported with export_stage_weights.py).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rl_adapt.engine.reward.dataset import build_reward_dataset
from rl_adapt.engine.reward.network import RewardNetConfig, train_reward_net
from rl_adapt.engine.rollout import policy_outputs
from rl_adapt.evaluation.inputs import load_labelled, load_model
from rl_adapt.evaluation.reliability import reward_reliability
from rl_adapt.policies.nnunet import load_model_folder
from rl_adapt.training.styled_source import StyledPairs

p = argparse.ArgumentParser()
p.add_argument("run", type=Path)
p.add_argument("model", type=Path)
p.add_argument("labelled", type=Path)
p.add_argument("--features", type=int, default=8)
p.add_argument("--depth", type=int, default=3)
p.add_argument("--steps", type=int, default=400)
p.add_argument("--reward-images", type=int, default=256)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--border-weight", type=float, default=1.0,
               help="BCE weight of the pixels near the mask's own borders (RewardNetConfig.border_weight)")
p.add_argument("--border-px", type=int, default=3)
p.add_argument("--extra-model", type=Path, action="append", default=[],
               help="another model folder whose argmax masks of the same pairs join the reward data (repeatable)")
a = p.parse_args()
torch.set_num_threads(1)
run = a.run
policy = load_model_folder(a.model)
if True:  # the source teacher: restyled source images, the policy's masks, true labels
    pairs = StyledPairs.load(run / "styled_source.npz")
    train = np.flatnonzero(~pairs.held_out)
    rng = np.random.default_rng(a.seed)
    train = np.sort(rng.choice(train, min(a.reward_images, len(train)), replace=False))
    images = pairs.images[torch.as_tensor(train)]
    argmax, sampled = policy_outputs(policy.network, images, 1, 16, torch.Generator().manual_seed(a.seed))
    masks = [argmax, sampled[:, 0]]
    for extra in a.extra_model:
        masks.append(policy_outputs(load_model_folder(extra).network, images, 0, 16,
                                    torch.Generator().manual_seed(a.seed))[0])
    ds = build_reward_dataset(images.numpy(), masks, pairs.labels[torch.as_tensor(train)].numpy(), seed=a.seed)
cfg = RewardNetConfig(features=a.features, depth=a.depth, steps=a.steps, batch_size=8,
                      border_weight=a.border_weight, border_px=a.border_px)
net, stats = train_reward_net(ds, cfg, seed=a.seed)
model = load_model(a.model)
rel = reward_reliability(net, model, load_labelled(a.labelled), seed=0, progress=False)
print(json.dumps({"extra_models": [str(e) for e in a.extra_model], "border_weight": a.border_weight,
                  "border_px": a.border_px, "features": a.features, "depth": a.depth, "steps": a.steps,
                  "train_auroc_heldout": stats.get("auroc"), "auroc": rel["auroc"], "ece": rel["ece"],
                  "border_auroc": rel["border"]["auroc"], "border_ece": rel["border"]["ece"]}))
