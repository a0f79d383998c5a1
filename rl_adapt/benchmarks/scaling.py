"""Data-parallel scaling of the engine: PPO-update and rollout img/s with 1 and 2 gloo processes (CPU), and an
estimate for 8 GPUs x 1-4 nodes from the all-reduce size per step.

Measured, with the engine's own code (:class:`rl_adapt.engine.ppo.PixelPPO`, per-rank batch as in DDP):

* rollout img/s: the policy's forward, per-image seeded sampling, reference log-probs and the reward, summed over
  ranks (no communication: each rank serves its slice of every global batch);
* PPO-update img/s: forward, per-pixel clipped loss, backward, the gradient all-reduce, clip and Adam step,
  summed over ranks;
* efficiency = img/s with 2 processes / (2 x img/s with 1 process), in the same run (the machine is shared and
  noisy: ratios within one run, not absolute figures, are what to compare).

Then, for the nnU-Net default 2D network (33.5 M parameters at 256 x 256), the bytes one all-reduce moves per
optimizer step (fp32 and bf16 gradients; a ring all-reduce sends and receives 2 (N-1)/N times the buffer per
rank) and the time it takes at NVLink and InfiniBand bandwidths, against the step time of one GPU (the bf16 figure
of ``../shared/DESIGN.md``, 945 img/s PPO updates on one H100: no GPU step is measured by this script).

Run: ``python -m rl_adapt.benchmarks.scaling [--size 64] [--batch 4] [--reps 3] [--features 8,16,32,64]``
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp
from stable_baselines3.common.logger import Logger

from rl_adapt import distributed as dist
from rl_adapt.engine.ppo import PixelPPO, PPOConfig
from rl_adapt.benchmarks.engine import _Nop
from rl_adapt.policies.actor_critic import plain_unet

DEFAULT_2D_PARAMS = 33_500_000
"""Parameters of nnU-Net's default 2D network at a 256 x 256 median image (DESIGN.md)."""
LINKS_GBPS = {"NVLink 4 (H100, per GPU)": 450.0, "InfiniBand NDR 400 Gb/s (per node)": 50.0,
              "InfiniBand NDR 400 Gb/s (one per GPU, as in a DGX H100)": 50.0}
"""Usable one-direction bandwidths in GB/s (vendor figures, not measured here)."""
H100_PPO_IMG_S_BF16 = 945.0
"""PPO-update img/s of the default 2D net at 256 x 256 on one H100, bf16 eager (DESIGN.md, measured while planning)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: dist.World, size: int, batch: int, features: tuple[int, ...], reps: int) -> dict:
    """img/s of this rank's rollouts and PPO updates (``reps`` rollout + update rounds after one warm-up)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n_images = 64
    images = torch.randn(n_images, 1, size, size)
    labels = (images[:, 0] > 0).long()

    def reward(imgs, actions, indices):
        return (actions == labels[indices]).float()

    cfg = PPOConfig(lr=1e-5, n_envs=batch, n_steps=2, n_epochs=1, batch_size=batch, sampling="per_image")
    model = PixelPPO.from_network(plain_unet(1, 3, features), images, reward, cfg, device="cpu", seed=0,
                                  world=world)
    model.set_logger(Logger(folder=None, output_formats=[]))
    cb = _Nop()
    cb.init_callback(model)
    model.learn(batch * 2)  # warm-up
    roll, upd = [], []
    for _ in range(reps):
        dist.barrier(world)
        t0 = time.perf_counter()
        model.collect_rollouts(model.env, cb, model.rollout_buffer, n_rollout_steps=cfg.n_steps)
        t1 = time.perf_counter()
        model.train()
        t2 = time.perf_counter()
        roll.append(batch * cfg.n_steps / (t1 - t0))
        upd.append(batch * cfg.n_steps * cfg.n_epochs / (t2 - t1))
    params = sum(p.numel() for p in model.policy.network.parameters())
    return {"rollout_img_s": statistics.median(roll), "update_img_s": statistics.median(upd), "params": params}


def _worker(rank: int, size: int, port: int, args: tuple, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    world = dist.setup("cpu")
    clean = False
    try:
        out[rank] = measure(world, *args)
        clean = True
    finally:
        dist.teardown(world, clean)


def allreduce_estimate(params: int, step_s: float) -> list[dict]:
    """Bytes per optimizer step and the all-reduce time per link, against a step time of ``step_s`` seconds."""
    rows = []
    for dtype, nbytes in (("fp32", 4), ("bf16", 2)):
        buffer = params * nbytes
        for gpus, nodes in ((8, 1), (16, 2), (24, 3), (32, 4)):
            ring = 2 * (gpus - 1) / gpus * buffer  # bytes each rank sends (and receives)
            if nodes == 1:
                links = [("NVLink 4 (H100, per GPU)", ring)]
            else:  # a flat ring: with one network link per node its 8 GPUs share it; with one per GPU they do not
                links = [("InfiniBand NDR 400 Gb/s (per node)", ring * 8),
                         ("InfiniBand NDR 400 Gb/s (one per GPU, as in a DGX H100)", ring)]
            for link, per_link in links:
                seconds = per_link / (LINKS_GBPS[link] * 1e9)
                rows.append({"dtype": dtype, "gpus": gpus, "nodes": nodes, "buffer_MB": buffer / 1e6,
                             "ring_MB_per_rank": ring / 1e6, "link": link, "allreduce_ms": 1e3 * seconds,
                             "share_of_step": seconds / (seconds + step_s)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="images per rank per step")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--features", default="8,16,32,64")
    a = p.parse_args(argv)
    args = (a.size, a.batch, tuple(int(f) for f in a.features.split(",")), a.reps)
    one = measure(dist.SINGLE, *args)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), args, out), nprocs=2, join=True)
    two = {"rollout_img_s": sum(v["rollout_img_s"] for v in out.values()),
           "update_img_s": sum(v["update_img_s"] for v in out.values())}
    gpu_step_s = 32 / H100_PPO_IMG_S_BF16  # a 32-image minibatch per GPU (no GPU is measured here)
    result = {
        "cpu": {"size": a.size, "batch_per_rank": a.batch, "params": one["params"],
                "one_process": one, "two_processes": two,
                "efficiency_rollout": two["rollout_img_s"] / (2 * one["rollout_img_s"]),
                "efficiency_update": two["update_img_s"] / (2 * one["update_img_s"])},
        "gpu_estimate": {"params": DEFAULT_2D_PARAMS, "step_s_per_32_images": gpu_step_s,
                         "rows": allreduce_estimate(DEFAULT_2D_PARAMS, gpu_step_s)},
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
