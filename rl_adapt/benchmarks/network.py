"""Throughput of a loaded nnU-Net network through the project's path vs bare torch, same tensors, same process.

    python -m rl_adapt.benchmarks.network [--model FOLDER] [--size 128] [--batch 8] [--reps 5]

Without ``--model`` a network is built from a plan: the small CPU plan (5 stages, 8..128 features) on CPU, or
nnU-Net's default 2D net at 256x256 (7 stages, 32..512 features, ~33.5 M params) with ``--default-plan``.
Measured: forward (rollout) and forward+backward+AdamW (update) images/s for

* ``project``: :meth:`NnUNetModel.to_patch`-made inputs fed to ``model.network`` as the RL code does
  (the model object, its device and dtype handling);
* ``bare``: a plain ``torch.nn.Module`` rebuilt from the same plan with the same weights, same tensor.

On CUDA both run under bf16 autocast, eager, channels_last (and plain) — the ratio must be within 10 %.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from rl_adapt.policies.nnunet import plain_unet_plans, shrink_plan
from rl_adapt.policies.nnunet import NnUNetModel, build_network, load_model_folder


def _plans(size: int, default: bool) -> tuple[dict, dict]:
    """Synthetic 2D plans in nnU-Net's schema (no planner run needed)."""
    n = 7 if default else 5
    feats = [min(32 * 2 ** i, 512) for i in range(n)] if default else [8, 16, 32, 64, 128]
    base = plain_unet_plans(feats, [size, size], dataset_name="Dataset999_Bench")
    dj = {"channel_names": {"0": "US"}, "labels": {"background": 0, "LV": 1, "MYO": 2, "LA": 3}, "numTraining": 1,
          "file_ending": ".nii.gz"}
    return shrink_plan(base, feats, [size, size], 12, fit_median_to_patch=False, plans_name="nnUNetPlans") \
        if not default else base, dj


def _time(fn, reps: int, sync) -> float:
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def run(model_folder: str | None, size: int, batch: int, reps: int, default_plan: bool, device: str,
        rounds: int = 5) -> list[dict]:
    """Measure and return rows ``{mode, path, fwd_img_s, fwdbwd_img_s}``; prints a table with ratios."""
    dev = torch.device(device)
    if model_folder:
        model = load_model_folder(model_folder, device=dev)
    else:
        plans, dj = _plans(size, default_plan)
        model = NnUNetModel.from_plans(plans, dj, device=dev, seed=0)
    p0, p1 = model.patch_size
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (p0, p1)).astype(np.float32) for _ in range(batch)]
    x = torch.stack([model.to_patch(im, model.spacing)[0] for im in imgs]).to(dev)
    bare = build_network(model.plans_manager, model.configuration_manager, model.dataset_json).to(dev)
    bare.load_state_dict(model.network.state_dict())
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    modes = [("fp32", False, False)]
    if dev.type == "cuda":
        modes += [("bf16", True, False), ("bf16+channels_last", True, True)]
    rows = []
    for name, bf16, cl in modes:
        nets = {}
        for path in ("bare", "project"):
            net = copy.deepcopy(bare if path == "bare" else model.network)
            if cl:
                net = net.to(memory_format=torch.channels_last)
            nets[path] = (net, torch.optim.AdamW(net.parameters(), lr=1e-5))
        xin = x.contiguous(memory_format=torch.channels_last) if cl else x

        def fwd(net):
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                net(xin)

        def fwdbwd(net, opt):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                out = net(xin)
            out.float().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        # interleaved rounds in alternating order; the best round of each path is reported (robust to a busy,
        # shared machine where other processes only ever slow a round down)
        times = {p: {"f": [], "fb": []} for p in nets}
        for r in range(rounds):
            for path in (("bare", "project") if r % 2 == 0 else ("project", "bare")):
                net, opt = nets[path]
                net.eval()
                times[path]["f"].append(_time(lambda: fwd(net), reps, sync))
                net.train()
                times[path]["fb"].append(_time(lambda: fwdbwd(net, opt), reps, sync))
        for path in nets:
            rows.append({"mode": name, "path": path, "fwd_img_s": batch / float(np.min(times[path]["f"])),
                         "fwdbwd_img_s": batch / float(np.min(times[path]["fb"]))})
    params = sum(p.numel() for p in model.network.parameters())
    print(f"device {dev}  patch {p0}x{p1}  batch {batch}  params {params / 1e6:.2f} M  threads {torch.get_num_threads()}")
    print(f"{'mode':<20}{'path':<9}{'fwd img/s':>12}{'fwd+bwd img/s':>16}")
    for r in rows:
        print(f"{r['mode']:<20}{r['path']:<9}{r['fwd_img_s']:>12.1f}{r['fwdbwd_img_s']:>16.1f}")
    for name, _, _ in modes:
        b = next(r for r in rows if r["mode"] == name and r["path"] == "bare")
        p = next(r for r in rows if r["mode"] == name and r["path"] == "project")
        print(f"ratio project/bare [{name}]: forward {p['fwd_img_s'] / b['fwd_img_s']:.3f}  "
              f"forward+backward {p['fwdbwd_img_s'] / b['fwdbwd_img_s']:.3f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="nnU-Net results folder (default: network built from a plan)")
    ap.add_argument("--size", type=int, default=0, help="patch size when no --model (default 128 CPU / 256 GPU)")
    ap.add_argument("--batch", type=int, default=0, help="batch (default 4 CPU / 32 GPU)")
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions (default 3 CPU / 20 GPU)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the best round is reported")
    ap.add_argument("--default-plan", action="store_true", help="nnU-Net's default 2D net (7 stages, 32..512)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    gpu = device.startswith("cuda")
    default_plan = a.default_plan or gpu
    run(a.model, a.size or (256 if default_plan else 128), a.batch or (32 if gpu else 4), a.reps or (20 if gpu else 2),
        default_plan, device, a.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
