"""A ceiling, not a method: the reward network taught with the TARGET site's true labels (the engine never reads
them): per-pixel targets (the adapted policy's argmax == true label) on the target images, the same training and
temperature calibration as the engine's reward, then scored like `rl-adapt evaluate --reward` on another labelled
set (the dev patients): how far a reward of this kind gets near borders when it is taught where the masks are wrong
on the very site.

Usage: python results/camus220/probe_reward_with_target_labels.py PRESET_DIR TARGET_DIR DEV_DIR FEATURES DEPTH STEPS
PRESET_DIR is a run.sh preset folder (its rl/ run gives the policy). Prints one JSON line.
"""
import sys, json, glob, time
from pathlib import Path
import numpy as np, torch
from rl_adapt.evaluation.inputs import load_model, load_labelled
from rl_adapt.evaluation.reliability import reward_reliability
from rl_adapt.engine.reward.network import RewardNetConfig, train_reward_net
from rl_adapt.engine.reward.dataset import RewardDataset
torch.set_num_threads(1)
P, target, dev = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
feat, depth, steps = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
rl = load_model(Path(glob.glob(str(P / "rl/model") + "/*/*/")[0]))
imgs, labs, acts = [], [], []
for c in load_labelled(target, progress=False):
    patch, _ = rl.to_patch(c.image, c.spacing)
    with torch.no_grad():
        o = rl.network(patch[None].float()); o = o[0] if isinstance(o, (list, tuple)) else o
    imgs.append(patch.numpy()); labs.append(rl.label_to_patch(c.image, c.label, c.spacing)); acts.append(o.argmax(1)[0].numpy().astype(np.uint8))
n = len(imgs)
ds = RewardDataset(images=np.stack(imgs).astype(np.float32), corrected=np.stack(labs), segs=np.stack(acts),
                   image_index=np.arange(n), kind=["argmax"] * n)
t = time.time()
net, stats = train_reward_net(ds, RewardNetConfig(features=feat, depth=depth, steps=steps, batch_size=16), seed=0)
rel = reward_reliability(net, rl, load_labelled(dev, progress=False), progress=False)
print(json.dumps({"features": feat, "depth": depth, "steps": steps, "train_s": round(time.time() - t),
                  "auroc": round(rel["auroc"], 3), "ece": round(rel["ece"], 3),
                  "border_auroc": round(rel["border"]["auroc"], 3), "border_ece": round(rel["border"]["ece"], 3),
                  "held_out_target_auroc": round(stats.get("auroc", float("nan")), 3)}))
