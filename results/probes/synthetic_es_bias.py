"""Probe (not part of the engine): LV cavity area at ED and ES in a demo run's own target images — truth vs the
source argmax, the corrections and the next argmax — to see whether the corrections shrink the cavity's
contraction. The truth is regenerated (synthetic anatomy depends on seed and patient number only), e.g.
  rl-adapt synth --domain target-shadow --patients 40 --first-patient 5001 --seed 0 --size 128 --format nnunet --out LAB
usage: DEMO_DIR LAB"""
import glob, sys
import numpy as np, torch
torch.set_num_threads(1)
from rl_adapt.data.readers import read_dataset
from rl_adapt.policies.nnunet import load_model_folder
from rl_adapt.policies.inference import centre_pad_crop
run, lab_dir = sys.argv[1:3]
model = load_model_folder(glob.glob(f"{run}/source_model/*/*/plans.json")[0].rsplit("/", 1)[0], device="cpu")
target = read_dataset(f"{run}/data/target", with_labels=False)
labelled = {c.name: c for c in read_dataset(lab_dir, with_labels=True)}
truth = []
for c in target:  # the truth in the policy's patch geometry, as the run's masks are stored
    ref = labelled[c.name]
    _, seg, _ = model.preprocess_pair(ref.image, ref.label, ref.spacing)
    truth.append(centre_pad_crop(np.maximum(seg, 0)[None], model.patch_size, 0)[0][0])
es = np.array([c.name.endswith("ES") for c in target])
sets = {"truth": np.stack(truth)}
for k in range(len(glob.glob(f"{run}/adapt/iter*/corrected.npz"))):
    sets[f"argmax iter{k}"] = np.load(f"{run}/adapt/iter{k}/rollout.npz")["argmax"]
    sets[f"corrected iter{k}"] = np.load(f"{run}/adapt/iter{k}/corrected.npz")["corrected"]
for name, masks in sets.items():
    lv = (masks == 1).reshape(len(masks), -1).sum(1)
    print(f"{name:18s} LV pixels ED {lv[~es].mean():7.1f}  ES {lv[es].mean():7.1f}  ES/ED {lv[es].mean() / lv[~es].mean():.3f}")
