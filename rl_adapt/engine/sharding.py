"""The loop's per-image stages in a data-parallel job: each rank works on its shard of the target images
(:func:`rl_adapt.distributed.shard`) and every rank ends with the whole result. In a one-process world they are the
plain stages, unchanged."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rl_adapt import distributed as dist
from rl_adapt.engine.corrector import CorrectionResult, Corrections, Corrector, correction_stage
from rl_adapt.engine.rollout import Rollout, RolloutConfig, policy_outputs, rollout


def sharded_rollout(net: torch.nn.Module, images: torch.Tensor, cfg: RolloutConfig, seed: int,
                    world: dist.World) -> tuple[Rollout, dict]:
    """:func:`rl_adapt.engine.rollout.rollout` of the (N, 1, H, W) ``images``, each rank on its shard (its samples
    seeded with ``seed`` and its rank)."""
    if not world.active:
        return rollout(net, images, cfg, seed)
    mine = torch.as_tensor(dist.shard(len(images), world))
    part, _ = rollout(net, images[mine.to(images.device)], cfg, seed + 7919 * world.rank)
    n = len(images)
    return Rollout(argmax=np.stack(dist.gather_shards(list(part.argmax), n, world)),
                   samples=np.stack(dist.gather_shards(list(part.samples), n, world))), {"n": n}


_PER_IMAGE = ("corrected", "path", "valid_before", "valid_after", "failed_after", "dice_to_input", "accepted")


def sharded_correction(corrector: Corrector, masks: np.ndarray, names: Sequence[str],
                       world: dist.World) -> tuple[Corrections, dict]:
    """:func:`rl_adapt.engine.corrector.correction_stage` of the (N, H, W) ``masks``, each rank on its shard."""
    if not world.active:
        return correction_stage(corrector, masks, names)
    mine = dist.shard(len(masks), world)
    part = corrector.correct(masks[mine], names=[names[i] for i in mine])
    per_image = list(zip(*(list(getattr(part, f)) for f in _PER_IMAGE)))
    full = list(zip(*dist.gather_shards(per_image, len(names), world)))
    res = CorrectionResult(**{f: (np.stack(v) if f == "corrected" else list(v)) for f, v in zip(_PER_IMAGE, full)},
                           names=list(names))
    return Corrections(corrected=res.corrected, accepted=np.asarray(res.accepted, bool),
                       valid=np.asarray(res.valid_after, bool), path=np.asarray(res.path)), res.summary()


def sharded_argmax(net: torch.nn.Module, images: torch.Tensor, batch_size: int, world: dist.World) -> np.ndarray:
    """(N, H, W) uint8 argmax of ``net`` on the (N, 1, H, W) ``images``, each rank on its shard."""
    gen = torch.Generator(device=images.device).manual_seed(0)  # no samples are drawn
    if not world.active:
        return policy_outputs(net, images, 0, batch_size, gen)[0]
    mine = torch.as_tensor(dist.shard(len(images), world))
    part = policy_outputs(net, images[mine.to(images.device)], 0, batch_size, gen)[0]
    return np.stack(dist.gather_shards(list(part), len(images), world))
