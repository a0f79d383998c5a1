"""Does the policy's patch resolution cap a reward near borders? The perfect reward at the patch (1 where the argmax
action equals the true label brought to the patch), mapped back to the image exactly as `reward_in_geometry` maps the
reward network's map, scored like `rl-adapt evaluate --reward` in the border band.

Usage: python results/camus220/probe_patch_resolution_ceiling.py MODEL_DIR LABELLED_DIR   (one JSON line)
"""
import sys, json
from pathlib import Path
import numpy as np, torch
from sklearn.metrics import roc_auc_score
from rl_adapt.evaluation.inputs import load_labelled, load_model
from rl_adapt.evaluation.reliability import border_band
torch.set_num_threads(1)
model = load_model(Path(sys.argv[1])); cases = load_labelled(Path(sys.argv[2]), progress=False)
R, W, Wp = [], [], []
for c in cases:
    patch, props = model.to_patch(c.image, c.spacing)
    with torch.no_grad():
        out = model.network(patch[None].to(model.device)); out = out[0] if isinstance(out, (list, tuple)) else out
    action = out.argmax(1)[0].cpu().numpy()
    lp = model.label_to_patch(c.image, c.label, c.spacing)
    stack = np.zeros((model.num_classes,) + action.shape, np.float32); stack[0] = (action == lp); stack[1] = 1
    back = model.from_patch(stack, props)
    pred = np.asarray(model.from_patch(action, props), dtype=np.uint8)
    cov = back[1] > 0.5
    band = cov & border_band(pred, c.label)
    R.append(np.clip(back[0], 0, 1)[band]); W.append(pred[band] != c.label[band])
w = np.concatenate(W); r = np.concatenate(R)
print(json.dumps({"n": int(w.size), "wrong_share": float(w.mean()), "oracle_patch_auroc": float(roc_auc_score(w, -r))}))
