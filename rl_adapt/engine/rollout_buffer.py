"""Torch-resident rollout buffer for one-step, per-pixel episodes.

Preallocated once (``capacity`` images) on the training device; ``add`` copies a batch in place, so the
hot path neither allocates large arrays nor leaves the device. With one-step episodes the return of every
pixel is its shaped reward ``r - beta * (log pi_old - log pi_ref)`` and the advantage is that return minus
the pixel's value estimate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class PixelBatch:
    """A minibatch of rollout data; maps are (b, H, W), images (b, C, H, W)."""

    obs: torch.Tensor
    actions: torch.Tensor  # int64
    old_log_prob: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


class PixelRolloutBuffer:
    """Fixed-capacity store of images, per-pixel actions, log-probs (policy and reference), rewards, values.

    :param capacity: images per rollout (``n_steps * num_envs``).
    :param image_shape: (C, H, W).
    :param num_classes: K (actions stored as uint8 when K <= 256, else int64).
    :param device: where everything lives.
    """

    def __init__(self, capacity: int, image_shape: tuple[int, int, int], num_classes: int,
                 device: torch.device | str = "cpu"):
        self.capacity = int(capacity)
        self.device = torch.device(device)
        c, h, w = image_shape
        n = self.capacity
        kw = {"device": self.device}
        act_dtype = torch.uint8 if num_classes <= 256 else torch.int64
        self.obs = torch.empty((n, c, h, w), dtype=torch.float32, **kw)
        self.actions = torch.empty((n, h, w), dtype=act_dtype, **kw)
        self.log_prob = torch.empty((n, h, w), dtype=torch.float32, **kw)
        self.ref_log_prob = torch.empty((n, h, w), dtype=torch.float32, **kw)
        self.rewards = torch.empty((n, h, w), dtype=torch.float32, **kw)
        self.values = torch.empty((n, h, w), dtype=torch.float32, **kw)
        self.returns = torch.empty((n, h, w), dtype=torch.float32, **kw)
        self.advantages = torch.empty((n, h, w), dtype=torch.float32, **kw)
        self.pos = 0

    def reset(self) -> None:
        """Forget the stored rollout (memory is kept)."""
        self.pos = 0

    @property
    def full(self) -> bool:
        return self.pos >= self.capacity

    def add(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, values: torch.Tensor,
            log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> None:
        """Copy one batch (b images) in place: obs (b,C,H,W), all others (b,H,W)."""
        b = obs.shape[0]
        if self.pos + b > self.capacity:
            raise RuntimeError(f"rollout buffer overflow: {self.pos} + {b} > {self.capacity}")
        s = slice(self.pos, self.pos + b)
        self.obs[s].copy_(obs)
        self.actions[s].copy_(actions)
        self.rewards[s].copy_(rewards)
        self.values[s].copy_(values)
        self.log_prob[s].copy_(log_prob)
        self.ref_log_prob[s].copy_(ref_log_prob)
        self.pos += b

    def compute_returns_and_advantages(self, beta_kl: float) -> None:
        """returns = r - beta * (log pi_old - log pi_ref) per pixel; advantages = returns - V (one-step episodes)."""
        n = self.pos
        torch.sub(self.log_prob[:n], self.ref_log_prob[:n], out=self.returns[:n])
        self.returns[:n].mul_(-float(beta_kl)).add_(self.rewards[:n])
        torch.sub(self.returns[:n], self.values[:n], out=self.advantages[:n])

    def minibatches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[PixelBatch]:
        """Shuffled minibatches of ``batch_size`` images (last one may be smaller) over the stored rollout."""
        n = self.pos
        perm = torch.randperm(n, generator=generator).to(self.device)
        for start in range(0, n, batch_size):
            yield self.batch(perm[start : start + batch_size])

    def batch(self, idx: torch.Tensor) -> PixelBatch:
        """The stored images at positions ``idx`` (1-D int64 on the buffer's device) as one minibatch."""
        return PixelBatch(
            obs=self.obs.index_select(0, idx),
            actions=self.actions.index_select(0, idx).long(),
            old_log_prob=self.log_prob.index_select(0, idx),
            old_values=self.values.index_select(0, idx),
            advantages=self.advantages.index_select(0, idx),
            returns=self.returns.index_select(0, idx),
        )
