"""Probe (not part of the engine): source images styled with the target's mean amplitude spectrum + their true labels: does supervised fine-tuning
on them move the source model toward the shifted target (CAMUS)? usage: SRC MODEL TGT [n_src] [steps]"""
import sys, copy, time, numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(1); torch.manual_seed(0)
from rl_adapt.evaluation.inputs import load_labelled
from rl_adapt.policies.nnunet import load_model_folder
from rl_adapt.policies.inference import centre_pad_crop
from rl_adapt.measures.metrics import mean_dice
src_dir, mdir, tgt_dir = sys.argv[1:4]
n_src = int(sys.argv[4]) if len(sys.argv) > 4 else 400
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 300
rng = np.random.default_rng(0)
src = load_labelled(src_dir); src = [src[i] for i in rng.choice(len(src), n_src, replace=False)]
tgt = load_labelled(tgt_dir)
def amp(cases):
    return np.mean([np.abs(np.fft.fft2(c.image.astype(np.float64) - c.image.mean())) for c in cases], 0)
A_s, A_t = amp(src), amp(tgt)  # target: images only
ratio = A_t / np.maximum(A_s, 1e-6)
def style(img):
    """The image's spectrum scaled by the target/source mean amplitude ratio (phase and mean kept)."""
    m = img.mean()
    return (np.real(np.fft.ifft2(np.fft.fft2(img.astype(np.float64) - m) * ratio)) + m).astype(np.float32)
model = load_model_folder(mdir, device="cpu")
P = model.patch_size
orig = copy.deepcopy(model.network.state_dict())
def batchify(styled):
    X, Y = [], []
    for c in src:
        d, s, _ = model.preprocess_pair(style(c.image) if styled else c.image, c.label, c.spacing)
        X.append(centre_pad_crop(d, P, 0.0)[0]); Y.append(centre_pad_crop(s[None], P, -1)[0][0])
    return torch.as_tensor(np.stack(X)).float(), torch.as_tensor(np.stack(Y)).long()
def evaluate():
    model.network.eval()
    with torch.inference_mode():
        return np.mean([mean_dice(model.predict(c.image, c.spacing), c.label) for c in tgt])
print("source on target", round(evaluate(), 4), flush=True)
for styled in (False, True):
    model.network.load_state_dict(orig)
    X, Y = batchify(styled)
    opt = torch.optim.Adam(model.network.parameters(), lr=1e-4)
    t0 = time.time(); model.network.train()
    for it in range(steps):
        idx = torch.as_tensor(rng.choice(len(X), 16, replace=False))
        xb, yb = X[idx], Y[idx]
        out = model.network(xb)
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss = F.cross_entropy(out.float(), yb, ignore_index=-1)
        opt.zero_grad(); loss.backward(); opt.step()
    print("fine-tuned on", "styled" if styled else "plain", "source:", round(evaluate(), 4), f"({time.time()-t0:.0f}s, loss {loss.item():.3f})", flush=True)
