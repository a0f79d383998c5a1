"""Benchmark of ``rl-adapt evaluate``: 220 patients x 2 views x 2 phases = 880 images, two models.

Target (issue 6): under 2 minutes on 2 CPU cores at 256², under 30 s on one GPU.

Setup (not timed): synthetic source-domain cases (:func:`rl_adapt.synth.domains.generate_domain`) written as an
nnU-Net raw dataset; a small source model pretrained briefly on a subset (:func:`rl_adapt.training.pretrain.pretrain`,
the CPU "small" plan) and a second model from it by a few TENT steps (:func:`rl_adapt.evaluation.baselines.run_baseline`).

Timed: one :func:`rl_adapt.evaluation.evaluate.evaluate` call (read data, load models, predict, metrics, clinical,
overlays, report), split per stage from its ``timings.json``. Reference measured in the same process:
a bare forward pass of the same network over the same number of patches (no preprocessing, resampling or
sliding window), so ``predict / bare`` is the overhead of nnU-Net-exact inference.

    python -m rl_adapt.benchmarks.evaluate [--patients 220] [--size 256] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from rl_adapt.config import load_config
from rl_adapt.data.writers import write_nnunet_raw
from rl_adapt.evaluation.baselines import BaselineConfig, run_baseline
from rl_adapt.evaluation.evaluate import EvaluateConfig, evaluate
from rl_adapt.evaluation.inputs import load_model
from rl_adapt.synth.domains import generate_domain
from rl_adapt.training.pretrain import PretrainConfig, pretrain


def _setup(work: Path, args) -> tuple[Path, Path, Path]:
    """Synthetic evaluation set, a briefly pretrained small source model and a TENT copy of it (not timed)."""
    done = work / "setup.json"
    if done.is_file():  # a --keep folder from an earlier run: reuse its data and models
        paths = json.loads(done.read_text())
        return Path(paths["data"]), Path(paths["src"]), Path(paths["tent"])
    data, train = work / "Dataset950_BenchEval", work / "Dataset951_BenchTrain"
    if not (data / "dataset.json").is_file():
        write_nnunet_raw(generate_domain("source", args.patients, seed=0, size=args.size), data,
                         dataset_name=data.name)
    if not (train / "dataset.json").is_file():
        write_nnunet_raw(generate_domain("source", args.train_patients, seed=1, size=args.size), train,
                         dataset_name=train.name)
    cfg = load_config(PretrainConfig, None, [f"plan.features=[{args.features}]",
                                             f"plan.patch_size=[{args.patch}, {args.patch}]", "plan.batch_size=4",
                                             "train.epochs=12", "train.iterations_per_epoch=25",
                                             f"train.num_threads={args.threads}", f"train.device={args.device}",
                                             "train.val_fraction=0.2", "train.val_every=100"])
    src = pretrain(train, work / "models", cfg, progress=False).model_dir
    tent = run_baseline(src, train, work / "tent", BaselineConfig(method="tent", steps=3, batch_size=4,
                                                                 device=args.device), progress=False)
    done.write_text(json.dumps({"data": str(data), "src": str(src), "tent": str(tent)}))
    return data, src, tent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=220)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU cores: 1 torch thread predicting + this many metric worker processes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-patients", type=int, default=8,
                   help="patients of the short pretraining (setup; a usable model keeps the masks realistic, "
                        "and metric costs with them)")
    p.add_argument("--features", default="8,16,32,64", help="features per stage of the small plan")
    p.add_argument("--patch", type=int, default=128, help="plan patch side (the median image is fitted to it)")
    p.add_argument("--keep", type=Path, help="keep (and reuse) the work folder here instead of a temporary one")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)  # setup only; evaluate predicts with 1 thread
    work_ctx = tempfile.TemporaryDirectory(prefix="bench_eval_") if args.keep is None else None
    work = Path(work_ctx.name) if work_ctx else args.keep
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    data, src, tent = _setup(work, args)
    setup_s = time.perf_counter() - t
    n_images = 4 * args.patients

    # reference: bare forward passes of the same network (a sample of 200, scaled to the 2 x N patches
    # evaluate predicts: every image here fits one patch, so one forward per prediction)
    model = load_model(src, args.device)
    n_forward = 2 * n_images
    n_ref = min(n_forward, 200)
    x = torch.randn(1, 1, *model.patch_size, device=model.device)
    torch.set_num_threads(1)
    with torch.inference_mode():
        model.network(x)
        t = time.perf_counter()
        for _ in range(n_ref):
            model.network(x)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        bare_s = (time.perf_counter() - t) * n_forward / n_ref

    out = work / "eval"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    summary = evaluate({"source": src, "tent": tent}, data, out,
                       config=EvaluateConfig(device=args.device, workers=args.threads, torch_threads=1), progress=False)
    total_s = time.perf_counter() - t
    tim = json.loads((out / "timings.json").read_text())

    n_params = sum(p.numel() for p in model.network.parameters())
    print(f"evaluate benchmark: {summary['n_images']} images ({args.patients} patients x 2 views x 2 phases) at "
          f"{args.size}², 2 models, {args.threads} core(s): 1 torch thread + {args.threads} metric "
          f"worker processes, device {args.device}")
    print(f"network: patch {model.patch_size}, plan spacing {tuple(round(s, 3) for s in model.spacing)} mm, "
          f"{n_params / 1e6:.2f} M parameters; setup (synth + short pretrain + TENT, or reuse) {setup_s:.0f} s, not timed")
    print(f"{'stage':<10} {'seconds':>8} {'share':>6}")
    for k, v in tim.items():
        if k.startswith("cpu_"):
            continue
        print(f"{k:<10} {v:8.1f} {100 * v / total_s:5.1f}%")
    cpu = tim.get("cpu_predict_metrics_clinical", float("nan"))
    load1 = os.getloadavg()[0]
    print(f"CPU seconds of predict + metrics + clinical (all processes): {cpu:.1f} s; 1-min load average at "
          f"the end {load1:.1f} on {os.cpu_count()} cores (other work on the machine inflates wall times)")
    print(f"{'TOTAL':<10} {total_s:8.1f}   (target < 120 s on 2 CPU cores, < 30 s on one GPU): "
          f"{'PASS' if total_s < (120 if args.device == 'cpu' else 30) else 'FAIL'}")
    print(f"reference: bare network forward (1 thread) x{n_forward} = {bare_s:.1f} s; predict / bare = "
          f"{tim['predict'] / max(bare_s, 1e-9):.2f}x; per image: predict {1000 * tim['predict'] / n_forward:.1f} ms, "
          f"metrics {1000 * tim['metrics'] / n_forward:.1f} ms")
    print("mean Dice: " + ", ".join(f"{n} {e['dice']['mean']:.3f}" for n, e in summary["models"].items()))
    if work_ctx:
        work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
