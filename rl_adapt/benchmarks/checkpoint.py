"""Cost of the pretraining resume checkpoint, as a share of the epoch it follows.

Run: ``python -m rl_adapt.benchmarks.checkpoint [--steps 70] [--batch 12] [--threads 1]``

For the networks of the CPU pretraining presets (``configs/pretrain_cpu_camus.yaml`` at 128 x 128 and its 64 x 64
variant: PlainConvUNet, deep supervision, AdamW), the script times training steps and
:meth:`~rl_adapt.training.pretrain_resume.PretrainCheckpoint.save` (network, optimizer and random states, written
atomically to a temporary folder) in the same process, and prints the save time over the time of one epoch of
``--steps`` steps (median of 5 saves; mean of 5 steps after one warm-up step).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from rl_adapt.training.pretrain import training_loss
from rl_adapt.training.pretrain_resume import PretrainCheckpoint

PLANS = {"64 x 64": ([16, 32, 64, 128], 64), "128 x 128": ([16, 32, 64, 128, 256], 128)}
"""Features per stage and patch size of the two CPU CAMUS plans."""


def network(features: list[int]) -> torch.nn.Module:
    """The small plan's PlainConvUNet (4 classes, deep supervision, instance norm), seeded."""
    torch.manual_seed(0)
    n = len(features)
    return PlainConvUNet(1, n, features, torch.nn.Conv2d, 3, [1] + [2] * (n - 1), [2] * n, 4, [2] * (n - 1), True,
                         torch.nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=True)


def measure(features: list[int], patch: int, steps: int, batch: int) -> dict:
    """Seconds per training step and per checkpoint save, the checkpoint's size and the save's share of an epoch."""
    net = network(features)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=3e-5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, patch, patch, generator=gen)
    y = torch.randint(0, 4, (batch, patch, patch), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        training_loss(net(x), y, batch_dice=True).backward()
        opt.step()

    step()  # the optimizer's state exists from here on, as in a checkpoint after an epoch
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    t_step = (time.perf_counter() - t0) / 5
    saves = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        for _ in range(5):
            t0 = time.perf_counter()
            weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            PretrainCheckpoint(epochs_done=1, network=weights, optimizer=opt.state_dict(), generator=gen.get_state(),
                               torch_rng=torch.get_rng_state()).save(path)
            saves.append(time.perf_counter() - t0)
        size = path.stat().st_size
    t_save = sorted(saves)[len(saves) // 2]
    return {"step_s": t_step, "save_s": t_save, "mb": size / 1e6, "share": t_save / (steps * t_step)}


def main(argv: list[str] | None = None) -> int:
    """Print one line per plan."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=70, help="steps per epoch (the CAMUS presets' 70)")
    ap.add_argument("--batch", type=int, default=12, help="batch size (the presets' 12)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the presets' 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name, (features, patch) in PLANS.items():
        r = measure(features, patch, args.steps, args.batch)
        print(f"{name}: checkpoint {r['mb']:.1f} MB, save {r['save_s'] * 1e3:.0f} ms, training step "
              f"{r['step_s'] * 1e3:.0f} ms; one save per epoch of {args.steps} steps adds {100 * r['share']:.2f} %")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
