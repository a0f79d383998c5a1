"""Probe (not part of the engine): the supervised reference for `train_on: expert` — fine-tune the source model with
cross-entropy on the expert-masked target images only, evaluate on the held-out patients.
usage: MODEL EXPERT_IMAGES_DATA EXPERT_MASK_DIR TEST_DATA [steps] [lr]
(EXPERT_IMAGES_DATA: any dataset holding the expert patients' images, e.g. the whole shifted validation group;
only images with a mask in EXPERT_MASK_DIR are used.)"""
import sys, time, numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(1); torch.manual_seed(0)
from rl_adapt.data.readers import read_dataset
from rl_adapt.evaluation.inputs import load_labelled
from rl_adapt.policies.nnunet import load_model_folder
from rl_adapt.policies.inference import centre_pad_crop
from rl_adapt.measures.metrics import mean_dice
mdir, img_dir, mask_dir, test_dir = sys.argv[1:5]
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 300
lr = float(sys.argv[6]) if len(sys.argv) > 6 else 1e-4
rng = np.random.default_rng(0)
masks = {c.name: np.asarray(c.image) for c in read_dataset(mask_dir, with_labels=False)}
train = [c for c in read_dataset(img_dir, with_labels=False) if c.name in masks]
test = load_labelled(test_dir)
model = load_model_folder(mdir, device="cpu")
P = model.patch_size
X, Y = [], []
for c in train:
    d, s, _ = model.preprocess_pair(c.image, masks[c.name].astype(np.uint8), c.spacing)
    X.append(centre_pad_crop(d, P, 0.0)[0]); Y.append(centre_pad_crop(s[None], P, -1)[0][0])
X, Y = torch.as_tensor(np.stack(X)).float(), torch.as_tensor(np.stack(Y)).long()
def evaluate():
    model.network.eval()
    with torch.inference_mode():
        return np.mean([mean_dice(model.predict(c.image, c.spacing), c.label) for c in test])
print(f"{len(train)} expert images, {len(test)} test images; source on test {evaluate():.4f}", flush=True)
opt = torch.optim.Adam(model.network.parameters(), lr=lr)
t0 = time.time()
for it in range(1, steps + 1):
    model.network.train()
    idx = torch.as_tensor(rng.choice(len(X), min(16, len(X)), replace=False))
    out = model.network(X[idx])
    out = out[0] if isinstance(out, (list, tuple)) else out
    loss = F.cross_entropy(out.float(), Y[idx], ignore_index=-1)
    opt.zero_grad(); loss.backward(); opt.step()
    if it % 100 == 0:
        print(f"step {it}: loss {loss.item():.3f}, test Dice {evaluate():.4f} ({time.time() - t0:.0f} s)", flush=True)
