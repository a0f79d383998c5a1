"""Engine throughput vs a bare-torch loop doing the same maths on the same network and batch.

Measures, in one process:

* rollout img/s: policy forward (+ per-pixel value), per-pixel Gumbel-max sampling, log-probs, the frozen
  reference's log-probs (KL shaping) and the reward call, written to a rollout store;
* PPO-update img/s: forward, per-pixel clipped surrogate + entropy + value MSE, backward, gradient clip,
  Adam step, over minibatches of the stored rollout;

for :class:`rl_adapt.engine.ppo.PixelPPO` (``collect_rollouts`` / ``train``) and for a hand-written torch loop, on
CPU and, when available, CUDA with bf16 autocast. Prints img/s and the ratio engine / bare (target >= 0.8).

Run: ``python -m rl_adapt.benchmarks.engine [--size 128] [--batch 8] [--reps 5] [--device cpu,cuda]``
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger

from rl_adapt.policies.actor_critic import plain_unet
from rl_adapt.engine.ppo import PixelPPO, PPOConfig


def tune_malloc() -> bool:
    """Keep glibc from returning large activation buffers to the OS after every step (mallopt); True if applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
    return bool(ok and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Nop(BaseCallback):
    def _on_step(self) -> bool:
        return True


class BareLoop:
    """The same rollout and update maths written directly in torch (the reference for the ratio)."""

    def __init__(self, model: PixelPPO, images: torch.Tensor, reward_fn: Callable, batch: int, n_steps: int):
        self.m = model
        self.policy = model.policy
        self.images = images
        self.reward_fn = reward_fn
        self.batch = batch
        self.n_steps = n_steps
        n, (c, h, w) = batch * n_steps, images.shape[1:]
        dev = images.device
        self.obs = torch.empty((n, c, h, w), device=dev)
        self.act = torch.empty((n, h, w), dtype=torch.uint8, device=dev)
        self.logp = torch.empty((n, h, w), device=dev)
        self.adv = torch.empty((n, h, w), device=dev)
        self.ret = torch.empty((n, h, w), device=dev)
        self.gen = torch.Generator(device=dev).manual_seed(0)

    def _autocast(self):
        if self.images.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _logits_values(self, x):
        p = self.policy
        logits = p.network(x)
        feats = p._tap.pop().detach()
        return logits, p.value_net(feats)[:, 0].float()

    @torch.no_grad()
    def rollout(self) -> None:
        p = self.policy
        p.network.eval()
        beta = self.m.beta_kl
        for s in range(self.n_steps):
            sl = slice(s * self.batch, (s + 1) * self.batch)
            x = self.images[sl]
            with self._autocast():
                logits, values = self._logits_values(x)
                ref_logits = p.reference_network(x)
            logp_all = F.log_softmax(logits.float(), 1)
            a = torch.argmax(logp_all.exp() / torch.empty_like(logp_all).exponential_(generator=self.gen), 1)
            lp = logp_all.gather(1, a[:, None])[:, 0]
            lref = F.log_softmax(ref_logits.float(), 1).gather(1, a[:, None])[:, 0]
            r = self.reward_fn(x, a, torch.arange(sl.start, sl.stop, device=x.device))
            self.obs[sl] = x
            self.act[sl] = a
            self.logp[sl] = lp
            self.ret[sl] = r - beta * (lp - lref)
            self.adv[sl] = self.ret[sl] - values

    def update(self, minibatch: int) -> None:
        p, cfg = self.policy, self.m.config
        p.network.train()
        params = [q for g in p.optimizer.param_groups for q in g["params"]]
        n = self.obs.shape[0]
        for _ in range(cfg.n_epochs):
            perm = torch.randperm(n).to(self.obs.device)
            for i in range(0, n, minibatch):
                idx = perm[i : i + minibatch]
                x, a = self.obs[idx], self.act[idx].long()
                with self._autocast():
                    logits, values = self._logits_values(x)
                logp_all = F.log_softmax(logits.float(), 1)
                lp = logp_all.gather(1, a[:, None])[:, 0]
                ratio = torch.exp(lp - self.logp[idx])
                adv = self.adv[idx]
                pg = -torch.min(adv * ratio, adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)).mean()
                ent = -(logp_all.exp() * logp_all).sum(1).mean()
                loss = pg - cfg.ent_coef * ent + cfg.vf_coef * F.mse_loss(values, self.ret[idx])
                p.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if not bool(torch.isfinite(loss.detach() + gn)):  # the same guard (one sync) as the engine
                    raise RuntimeError("diverged")
                p.optimizer.step()


def bench_device(device: torch.device, size: int, batch: int, n_steps: int, reps: int, features: tuple[int, ...],
                 classes: int = 4) -> dict:
    torch.manual_seed(0)
    n_images = batch * n_steps
    images = torch.randn(n_images, 1, size, size, device=device)
    labels = torch.randint(0, classes, (n_images, size, size), device=device)

    def reward_fn(x, a, idx):  # cheap, batched: agreement with fixed labels of the first images of the batch
        return (a == labels[: a.shape[0]]).float()

    cfg = PPOConfig(n_envs=batch, n_steps=n_steps, batch_size=batch, n_epochs=1, lr=1e-5)
    model = PixelPPO.from_network(plain_unet(1, classes, features), images, reward_fn, cfg, device=device, seed=0)
    model.set_logger(Logger(folder=None, output_formats=[]))
    bare = BareLoop(model, images, reward_fn, batch, n_steps)
    cb = _Nop()
    cb.init_callback(model)
    obs, _ = model.env.reset()
    model._last_obs = obs

    def engine_rollout():
        model.collect_rollouts(model.env, cb, model.rollout_buffer, n_steps)

    runs = {"engine_rollout": engine_rollout, "bare_rollout": bare.rollout,
            "engine_update": model.train, "bare_update": lambda: bare.update(batch)}
    for fn in runs.values():  # warm-up (allocator, cudnn autotune)
        fn()
        _sync(device)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):  # interleaved, so machine load hits both alike
        for key, fn in runs.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t)
    ips = {k: n_images * (cfg.n_epochs if "update" in k else 1) / statistics.median(v) for k, v in times.items()}
    return {
        "device": str(device),
        "bf16": device.type == "cuda",
        "threads": torch.get_num_threads(),
        "image": size,
        "batch": batch,
        "params_M": round(sum(p.numel() for p in model.policy.network.parameters()) / 1e6, 3),
        "rollout_img_s": {"engine": round(ips["engine_rollout"], 1), "bare": round(ips["bare_rollout"], 1),
                          "ratio": round(ips["engine_rollout"] / ips["bare_rollout"], 3)},
        "update_img_s": {"engine": round(ips["engine_update"], 1), "bare": round(ips["bare_update"], 1),
                         "ratio": round(ips["engine_update"] / ips["bare_update"], 3)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=128, help="image side (pixels)")
    ap.add_argument("--batch", type=int, default=8, help="images per env step and per minibatch")
    ap.add_argument("--n-steps", type=int, default=2, help="env steps per rollout")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    ap.add_argument("--features", default="16,32,64,128,128", help="U-Net channels per stage")
    ap.add_argument("--device", default="cpu,cuda", help="comma list; cuda skipped when unavailable")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: stable ratios on a shared machine; 0: torch default)")
    ap.add_argument("--no-malloc-tune", action="store_true", help="leave glibc malloc thresholds alone")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = False if args.no_malloc_tune else tune_malloc()
    features = tuple(int(f) for f in args.features.split(","))
    results = []
    for name in args.device.split(","):
        if name == "cuda" and not torch.cuda.is_available():
            continue
        res = bench_device(torch.device(name), args.size, args.batch, args.n_steps, args.reps, features)
        res["malloc_tuned"] = tuned
        results.append(res)
        print(json.dumps(res))
    worst = min(min(r["rollout_img_s"]["ratio"], r["update_img_s"]["ratio"]) for r in results)
    print(f"worst engine/bare ratio: {worst:.3f} ({'OK' if worst >= 0.8 else 'BELOW 0.8'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
