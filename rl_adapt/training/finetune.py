"""Supervised fine-tuning of a segmentation network on labelled patches with nnU-Net's loss (soft Dice +
cross-entropy) and the pretraining augmentation: the styled-source baseline, and the adaptation loop's warm start
on restyled source images."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from rl_adapt.config import bounded
from rl_adapt.distributed import SINGLE, World, rank_slice
from rl_adapt.training.loop import fit
from rl_adapt.training.pretrain import AugmentConfig, augment, training_loss


@dataclass
class FineTuneConfig:
    """Budget and optimiser of a supervised fine-tuning."""

    steps: int = bounded(300, ge=0)
    """Optimiser steps (0: none)."""
    batch_size: int = bounded(8, ge=1)
    """Patches per step."""
    lr: float = bounded(3e-4, gt=0.0)
    """Adam learning rate."""
    weight_decay: float = bounded(0.0, ge=0.0)
    """L2 weight decay."""
    grad_clip: float = bounded(12.0, ge=0.0)
    """Gradient norm clipping (0: off)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augmentation of every batch (the pretraining one by default)."""


def index_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of index batches: seeded permutations of ``range(n)``, each index once per pass."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]


def fine_tune(network: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: FineTuneConfig, seed: int,
              device: torch.device | str = "cpu", what: str = "fine-tuning", progress: bool = False,
              world: World = SINGLE,
              make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None) -> list[float]:
    """Fine-tune every parameter of ``network`` in place.

    :param images: (M, 1, H, W) float32 preprocessed patches; :param labels: (M, H, W) int64 label maps.
    :param seed: seed of the batch order, the augmentation and torch's global generator.
    :param make_optimizer: builds the optimizer of the parameters (default: Adam with ``cfg.lr`` and
        ``cfg.weight_decay``), e.g. the baselines' choice of Adam or SGD.
    :param world: a data-parallel job: ``cfg.batch_size`` patches per rank, each its slice of every global batch
        (augmented alike on every rank, then sliced), gradients averaged.
    :returns: the loss of every step.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    network.to(device).train()
    params = list(network.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = (make_optimizer(params) if make_optimizer is not None
           else torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    stream = index_batches(len(images), cfg.batch_size * world.size, gen)
    images, labels = images.cpu(), labels.cpu()

    def loss_at(step: int) -> torch.Tensor:
        idx = next(stream)
        x, y = augment(images[idx], labels[idx], cfg.augment, gen)
        if world.active:
            mine = rank_slice(len(idx), world) if len(idx) % world.size == 0 else slice(None)
            x, y = x[mine], y[mine]
        return training_loss(network(x.to(device)), y.to(device), batch_dice=True)

    losses = fit(loss_at, opt, params, cfg.steps, what=what, grad_clip=cfg.grad_clip, progress=progress,
                 postfix_every=1, world=world)
    network.eval()
    return losses
