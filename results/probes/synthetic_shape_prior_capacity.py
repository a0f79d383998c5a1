"""Probe (not part of the engine): quality of the corrections vs the shape prior's capacity on a labelled dev split
(patch geometry): train a prior of each given size on a demo's source label maps, correct the source model's masks of
the dev split as the loop does, and compare with the truth (Dice, validity, LV pixels at ED and ES).
usage: python results/probes/synthetic_shape_prior_capacity.py DEMO_DIR DEV_DIR SIZE:FEATURES:STEPS ...
(DEV_DIR: a labelled split of the demo's target vendor, e.g. `rl-adapt synth --domain target-shadow --patients 10
--first-patient 7001 --seed 0 --size 128 --format nnunet --out DEV`, as results/dev_sweep.sh makes it)."""
import sys, time, glob, tempfile
import numpy as np, torch
torch.set_num_threads(1)
from pathlib import Path
from rl_adapt.engine.loop import AdaptConfig, Adapter, AdaptInputs, policy_outputs
from rl_adapt.config import load_config
from rl_adapt.engine.corrector import Corrector
from rl_adapt.measures.metrics import mean_dice
from rl_adapt.engine.shape_prior import ShapePriorConfig, train_shape_prior
from rl_adapt.measures.anatomy import is_valid
from rl_adapt.data.readers import read_dataset
demo, dev = Path(sys.argv[1]), sys.argv[2]
model_dir = Path(glob.glob(f"{demo}/source_model/*/*/plans.json")[0]).parent
cfg = load_config(AdaptConfig, str(Path(__file__).resolve().parents[2] / "configs" / "adapt_cpu.yaml"))
ad = Adapter(AdaptInputs(model_dir=model_dir, target_dir=Path(dev)), cfg, tempfile.mkdtemp(prefix="probe_"), progress=False)
ad._load()
cases = list(read_dataset(dev, with_labels=True))
gt = np.stack([ad._label_patch(c.image, c.label, c.spacing) for c in cases])
es = np.array([c.name.endswith("ES") for c in cases])
am, _ = policy_outputs(ad.model.network, ad.images, 0, 16, torch.Generator().manual_seed(0))
src = [c for c in read_dataset(f"{demo}/data/source", with_labels=True)]
smasks = np.stack([ad._label_patch(c.image, c.label, c.spacing) for c in src])
def rep(name, m):
    lv = (m == 1).reshape(len(m), -1).sum(1)
    print(f"{name:22s} Dice {np.mean([mean_dice(a, b) for a, b in zip(m, gt)]):.4f} valid {np.mean([is_valid(x) for x in m]):.3f} "
          f"LV ED {lv[~es].mean():6.0f} ES {lv[es].mean():6.0f} ES/ED {lv[es].mean()/lv[~es].mean():.3f}", flush=True)
rep("truth", gt); rep("argmax", am)
for spec in sys.argv[3:]:
    size, feat, steps = map(int, spec.split(":"))
    t = time.time()
    prior = train_shape_prior(smasks, ShapePriorConfig(size=size, features=feat, steps=steps), device="cpu")
    c = Corrector(cfg.corrector, shape_prior=prior).correct(am)
    rep(f"prior {spec} ({time.time()-t:.0f}s)", c.corrected)
