"""Probe (not part of the engine): label-free class-proportion matching: shift the logits so the target set's predicted class fractions match the
source labels' fractions. Is the shifted argmax closer to the truth than the plain argmax? usage: DATA_SRC MODEL DATA_TGT..."""
import sys, numpy as np, torch
torch.set_num_threads(1)
from rl_adapt.evaluation.inputs import load_labelled
from rl_adapt.policies.nnunet import load_model_folder
from rl_adapt.measures.metrics import mean_dice
from rl_adapt.measures.anatomy import is_valid
src = load_labelled(sys.argv[1])
prior = np.mean([np.bincount(c.label.ravel(), minlength=4) / c.label.size for c in src], 0)
print("source label fractions", prior.round(4))
model = load_model_folder(sys.argv[2], device="cpu")
for tgt in sys.argv[3:]:
    cases = load_labelled(tgt)
    with torch.inference_mode():
        logp = [torch.log_softmax(torch.as_tensor(model.predict_logits(c.image, c.spacing)).float(), 0).numpy() for c in cases]
    truth = np.mean([np.bincount(c.label.ravel(), minlength=4) / c.label.size for c in cases], 0)
    def frac(b):  # soft fractions and hard fractions under bias b
        return np.mean([np.bincount((lp + b[:, None, None]).argmax(0).ravel(), minlength=4) / lp[0].size for lp in logp], 0)
    b = np.zeros(4)
    for it in range(30):
        f = frac(b)
        b[1:] += 0.5 * (np.log(prior[1:] + 1e-6) - np.log(f[1:] + 1e-6))
    def dice(b):
        return np.mean([mean_dice((lp + b[:, None, None]).argmax(0), c.label) for lp, c in zip(logp, cases)])
    print(tgt.split('/')[-1], "truth fractions", truth.round(4), "pred", frac(np.zeros(4)).round(4), "matched", frac(b).round(4), "bias", b.round(3))
    print("  Dice argmax", round(dice(np.zeros(4)), 4), " prior-matched", round(dice(b), 4),
          " oracle-matched (truth fractions)", end=" ")
    b2 = np.zeros(4)
    for it in range(30):
        b2[1:] += 0.5 * (np.log(truth[1:] + 1e-6) - np.log(frac(b2)[1:] + 1e-6))
    print(round(dice(b2), 4), flush=True)
