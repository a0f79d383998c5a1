"""The one optimisation loop every trainer of the project runs (pretraining, the reward network, the shape prior,
the test-time baselines): per step, a loss from the trainer's own batch, a divergence check, backward, gradient
clipping, the optimizer and scheduler steps, and a progress bar. PPO's update runs inside stable-baselines3's
frame (:mod:`rl_adapt.engine.ppo`) and is not a plain loop of this kind."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from rl_adapt.distributed import SINGLE, World, all_reduce_gradients, all_reduce_sum
from rl_adapt.errors import TrainingDiverged


def fit(loss_at: Callable[[int], torch.Tensor], optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor],
        steps: int, *, what: str, grad_clip: float | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, lr_at: Callable[[int], float] | None = None,
        progress: bool = False, postfix_every: int = 10,
        on_step: Callable[[int, float], None] | None = None, world: World = SINGLE) -> list[float]:
    """Run ``steps`` optimisation steps; returns the loss of every step (floats).

    :param loss_at: ``step -> loss`` (a scalar tensor): draws the step's batch and computes the loss.
    :param params: the parameters whose gradient norm is clipped (``grad_clip``; None or 0: no clipping).
    :param what: what is trained, for the progress bar and the error message.
    :param scheduler: stepped after every optimizer step.
    :param lr_at: ``step -> learning rate`` set on every parameter group before the step (e.g. nnU-Net's poly).
    :param on_step: called with ``(step, loss)`` after each step (e.g. a TensorBoard writer).
    :param world: a data-parallel job: each rank's loss is on its slice of the global batch and the gradients are
        averaged over ranks before clipping, so every rank takes the same step.
    :raises TrainingDiverged: the loss became NaN/Inf (the parameters are those of the previous step).
    """
    params = list(params)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=what, disable=None if progress and world.main else True, leave=False)
    for step in bar:
        if lr_at is not None:
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss = loss_at(step)
        finite = bool(torch.isfinite(loss))
        if world.active:  # every rank stops together, or none does
            finite = float(all_reduce_sum(torch.tensor([0.0 if finite else 1.0]), world)[0]) == 0
        if not finite:
            raise TrainingDiverged(f"{what}: the loss became {loss.item()} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(params, world)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
        if step % max(1, postfix_every) == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return losses
