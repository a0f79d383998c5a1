"""The rollout stage: the policy's argmax and sampled label maps on every target image."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rl_adapt.config import bounded
from rl_adapt.io_utils import save_npz
from rl_adapt.policies.distribution import PixelCategorical


@dataclass
class RolloutConfig:
    """How the policy's outputs on the target set are gathered for correction and reward training."""

    samples_per_image: int = bounded(2, ge=0)
    """Policy samples per target image added to the reward-net training set (besides the argmax)."""
    batch_size: int = bounded(16, ge=1)
    """Images per forward pass."""


@dataclass
class Rollout:
    """The policy's outputs on the N target patches (``iter{k}/rollout.npz``)."""

    argmax: np.ndarray
    """(N, H, W) uint8 argmax label maps."""
    samples: np.ndarray
    """(N, S, H, W) uint8 label maps sampled per pixel from the policy."""

    def save(self, path: Path) -> None:
        """Write both arrays to one compressed ``.npz``, atomically."""
        save_npz(path, argmax=self.argmax, samples=self.samples)

    @classmethod
    def load(cls, path: Path) -> "Rollout":
        """Read a rollout written by :meth:`save`."""
        with np.load(path) as data:
            return cls(argmax=data["argmax"], samples=data["samples"])


@torch.no_grad()
def policy_outputs(network: torch.nn.Module, images: torch.Tensor, samples: int, batch_size: int,
                   generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Argmax masks and ``samples`` sampled masks of ``network`` on ``images``.

    :param images: (N, 1, H, W) float32 preprocessed target patches (on the network's device).
    :param generator: torch generator on the images' device; draws the samples.
    :returns: argmax (N, H, W) uint8 and samples (N, S, H, W) uint8.
    """
    network.eval()
    n = images.shape[0]
    argmax = np.empty((n,) + tuple(images.shape[2:]), np.uint8)
    sampled = np.empty((n, samples) + tuple(images.shape[2:]), np.uint8)
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        dist = PixelCategorical(network(batch).float())
        argmax[start : start + len(batch)] = dist.mode().cpu().numpy().astype(np.uint8)
        for s in range(samples):
            sampled[start : start + len(batch), s] = dist.sample(generator=generator).cpu().numpy().astype(np.uint8)
    return argmax, sampled


def rollout(network: torch.nn.Module, images: torch.Tensor, cfg: RolloutConfig, seed: int) -> tuple[Rollout, dict]:
    """The rollout stage: argmax and ``cfg.samples_per_image`` samples of the policy on every target patch.

    :param images: (N, 1, H, W) float32 target patches on the network's device.
    :param seed: seed of the samples.
    :returns: the :class:`Rollout` and its figures (``n``).
    """
    gen = torch.Generator(device=images.device).manual_seed(seed)
    argmax, sampled = policy_outputs(network, images, cfg.samples_per_image, cfg.batch_size, gen)
    return Rollout(argmax=argmax, samples=sampled), {"n": int(len(argmax))}
