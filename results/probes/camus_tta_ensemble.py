"""Probe (not part of the engine): is a test-time-augmentation ensemble of the source model closer to the truth than its argmax? (CAMUS shifted val)
usage: MODEL DATA [n_images]"""
import sys, numpy as np, torch
torch.set_num_threads(1)
from scipy import ndimage as ndi
from rl_adapt.evaluation.inputs import load_labelled
from rl_adapt.policies.nnunet import load_model_folder
from rl_adapt.measures.metrics import mean_dice
model = load_model_folder(sys.argv[1], device="cpu")
cases = load_labelled(sys.argv[2])[: int(sys.argv[3]) if len(sys.argv) > 3 else None]
def gamma(g):
    def f(x):
        lo, hi = np.percentile(x, [0.5, 99.5]); y = np.clip((x - lo) / (hi - lo + 1e-6), 0, 1)
        return (y ** g) * (hi - lo) + lo
    return f
def sharpen(a, s):
    return lambda x: x + a * (x - ndi.gaussian_filter(x.astype(np.float32), s))
augs = {"id": (lambda x: x, False), "mirror": (lambda x: x, True), "g0.7": (gamma(0.7), False), "g1.4": (gamma(1.4), False),
        "sharp": (sharpen(1.0, 1.5), False), "smooth": (lambda x: ndi.gaussian_filter(x.astype(np.float32), 1.0), False)}
probs = {k: [] for k in augs}
labels = []
with torch.inference_mode():
    for c in cases:
        for k, (f, mir) in augs.items():
            lg = torch.as_tensor(model.predict_logits(f(c.image.astype(np.float32)), c.spacing, mirror=mir))
            probs[k].append(torch.softmax(lg.float(), 0).numpy())
        labels.append(c.label)
def score(keys):
    return np.mean([mean_dice(np.mean([probs[k][i] for k in keys], 0).argmax(0), labels[i]) for i in range(len(labels))])
for k in augs: print(k, round(score([k]), 4))
for keys in (["id", "mirror"], ["id", "g0.7", "g1.4"], ["id", "mirror", "g0.7", "g1.4"], ["id", "sharp"], ["id", "mirror", "g0.7", "g1.4", "sharp"], list(augs)):
    print("+".join(keys), round(score(keys), 4))
