"""Does the reward network find wrong pixels near borders better when it also sees the policy's softmax (K more
input channels, the adapted policy frozen)? The reward network is trained as the engine trains it (BCE, temperature on
held-out images) and scored like `rl-adapt evaluate --reward` on the policy's argmax masks of a labelled set.
MODE ceiling: taught with the TARGET site's true labels on the policy's masks of the target images (a ceiling, not a
method: the engine never reads them); MODE free: taught label-free on the run's restyled source pairs (the policy's
argmax and one sample of 256 training pairs, true source labels), the engine's data.

Usage: python results/camus220/probe_reward_policy_probs.py MODE RUN TARGET_DIR DEV_DIR FEATURES DEPTH STEPS PROBS
(PROBS 1: with the softmax channels, 0: without; TARGET_DIR is read in ceiling mode only; prints one JSON line)
"""
import sys, json, glob, time
from pathlib import Path
import numpy as np, torch
import rl_adapt.engine.reward.network as RN
from rl_adapt.evaluation.inputs import load_model, load_labelled
from rl_adapt.evaluation.reliability import reward_reliability
from rl_adapt.engine.reward.dataset import RewardDataset, build_reward_dataset
from rl_adapt.engine.rollout import policy_outputs
from rl_adapt.training.styled_source import StyledPairs
torch.set_num_threads(1)
mode, run, target, dev = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
feat, depth, steps, with_probs = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), sys.argv[8] == "1"
rl = load_model(Path(glob.glob(str(run / "model") + "/*/*/")[0]))
K = rl.num_classes
def probs_of(patches):  # (B,1,H,W) -> (B,K,H,W)
    with torch.no_grad():
        out = []
        for s in range(0, len(patches), 16):
            o = rl.network(torch.as_tensor(patches[s:s + 16]).float()); o = o[0] if isinstance(o, (list, tuple)) else o
            out.append(torch.softmax(o.float(), 1))
        return torch.cat(out)
if mode == "ceiling":
    imgs, labs, acts = [], [], []
    for c in load_labelled(target, progress=False):
        patch, _ = rl.to_patch(c.image, c.spacing)
        imgs.append(patch.numpy()); labs.append(rl.label_to_patch(c.image, c.label, c.spacing))
    imgs = np.stack(imgs).astype(np.float32); pr = probs_of(imgs)
    acts = pr.argmax(1).numpy().astype(np.uint8)
    n = len(imgs)
    ds = RewardDataset(images=imgs, corrected=np.stack(labs), segs=acts, image_index=np.arange(n), kind=["argmax"] * n)
else:
    pairs = StyledPairs.load(run / "styled_source.npz")
    train = np.flatnonzero(~pairs.held_out)
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(train, min(256, len(train)), replace=False))
    images = pairs.images[torch.as_tensor(train)]
    argmax, sampled = policy_outputs(rl.network, images, 1, 16, torch.Generator().manual_seed(0))
    ds = build_reward_dataset(images.numpy(), [argmax, sampled[:, 0]], pairs.labels[torch.as_tensor(train)].numpy(), seed=0)
    pr = probs_of(ds.images)
if with_probs:
    ds.images = np.concatenate([ds.images, pr.numpy()], 1).astype(np.float32)
    orig = RN.RewardUNet
    RN.RewardUNet = lambda cin, f, d: orig(cin + K, f, d)
t = time.time()
net, stats = RN.train_reward_net(ds, RN.RewardNetConfig(features=feat, depth=depth, steps=steps, batch_size=16), seed=0)
class Wrapped:
    def score(self, images, actions):
        x = images.float()
        if with_probs:
            x = torch.cat([x, probs_of(x.numpy())], 1)
        return net.score(x, actions)
rel = reward_reliability(Wrapped(), rl, load_labelled(dev, progress=False), progress=False)
print(json.dumps({"mode": mode, "probs": with_probs, "features": feat, "depth": depth, "steps": steps, "train_s": round(time.time() - t),
                  "auroc": round(rel["auroc"], 3), "ece": round(rel["ece"], 3),
                  "border_auroc": round(rel["border"]["auroc"], 3), "border_ece": round(rel["border"]["ece"], 3),
                  "conf_border_auroc": round(rel["policy_confidence"]["border"]["auroc"], 3),
                  "held_out_auroc": round(stats.get("auroc", float("nan")), 3)}))
