"""Data parallelism on torch.distributed, as ``torchrun`` (or ``srun torchrun``) sets it up.

``torchrun --nproc_per_node=N -m rl_adapt COMMAND ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in their environment; :func:`setup` joins them into one process group (NCCL on GPUs, gloo on CPU).
The same command without torchrun is one process, a "world" of one, and every helper here is then a no-op, so the
single-process path stays exactly what it was.

Conventions the engine follows:

* **batches are per process** (as with DDP): ``n_envs``/``batch_size`` of one process; the global batch is
  ``world`` times larger. Every rank draws the same global permutation and takes its slice of each global batch
  (:func:`rank_slice`), so a world of 2 with batch B/2 sees the images a world of 1 with batch B sees;
* **gradients are averaged** over ranks before each optimizer step (:func:`all_reduce_gradients`), so the ranks
  hold identical weights after every step;
* **rank 0 writes** outputs and checkpoints; the others wait (:func:`barrier`) and read them back, so a resumed
  run finds the same state on every rank.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as td

from rl_adapt.errors import RLAdaptError

log = logging.getLogger(__name__)

WAIT_LIMIT = timedelta(hours=2)
"""How long a rank waits in a collective before the job fails. Some stages run on rank 0 alone while the others wait
at a barrier (the scanner fit and the restyling: minutes on one CPU thread; the shape prior's training), longer than
NCCL's default of 10 minutes on a slow node, so the limit is raised for every backend."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one job."""

    rank: int = 0
    """0..size-1; rank 0 writes the outputs."""
    size: int = 1
    """Number of processes (1 without torchrun)."""
    local_rank: int = 0
    """Rank on this node: the GPU it uses."""

    @property
    def main(self) -> bool:
        """This process writes outputs and logs progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: the collective operations do something."""
        return self.size > 1


SINGLE = World()
"""The world of one process."""


def from_environment() -> World:
    """The world ``torchrun`` describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (one process without them)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: str = "auto") -> World:
    """Join the process group of a torchrun job (once; later calls return the same world).

    :param device: the job's device: NCCL when it is CUDA (each process on ``cuda:LOCAL_RANK``), gloo otherwise.
    :returns: the world; :data:`SINGLE` without torchrun.
    """
    world = from_environment()
    if not world.active or td.is_initialized():
        return world
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world.local_rank)
    td.init_process_group(backend="nccl" if cuda else "gloo", timeout=WAIT_LIMIT)
    log.info("process %d of %d joined (%s)", world.rank, world.size, "nccl" if cuda else "gloo")
    return world


def teardown(world: World, clean: bool = True) -> None:
    """Leave the process group (no-op when none was joined). With ``clean`` (the rank's work ended normally) every
    rank first waits for the others, so none tears down its connections while another is still finishing its last
    collective (with gloo that can abort the other rank's process); after a failure the group is destroyed at once,
    as waiting could hang."""
    if not (td.is_available() and td.is_initialized()):
        return
    try:
        if clean and world.active:
            td.barrier()
    finally:
        td.destroy_process_group()


def current() -> World:
    """The world of the running job (after :func:`setup`; one process before it or without torchrun)."""
    return from_environment() if td.is_available() and td.is_initialized() else SINGLE


def device_of(world: World, name: str) -> str:
    """The device name a rank uses: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a multi-process job."""
    if world.active and name in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return name


def barrier(world: World) -> None:
    """Wait for every rank (no-op for one process)."""
    if world.active:
        td.barrier()


def rank_slice(n: int, world: World) -> slice:
    """This rank's equal slice of a global batch of ``n`` items (``n`` must divide by the world size)."""
    if n % world.size:
        raise ValueError(f"a global batch of {n} does not split over {world.size} processes")
    per = n // world.size
    return slice(world.rank * per, (world.rank + 1) * per)


def shard(n: int, world: World) -> np.ndarray:
    """Indices ``0..n-1`` this rank owns for per-item work (strided: rank r gets r, r + size, ...)."""
    return np.arange(world.rank, n, world.size)


def all_gather_objects(obj: Any, world: World) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not world.active:
        return [obj]
    out: list = [None] * world.size
    td.all_gather_object(out, obj)
    return out


def gather_shards(values: Sequence, n: int, world: World) -> list:
    """Reassemble per-item results computed on :func:`shard` into the full list of ``n`` items, on every rank."""
    if not world.active:
        return list(values)
    full: list = [None] * n
    for rank, part in enumerate(all_gather_objects(list(values), world)):
        for i, v in zip(range(rank, n, world.size), part):
            full[i] = v
    return full


def broadcast_object(obj: Any, world: World, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not world.active:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], Any], world: World) -> Any:
    """``fn()`` on rank 0, its result handed to every rank; an :class:`~rl_adapt.errors.RLAdaptError` it raises is
    raised on every rank (the others get its message), so a refused input stops the whole job at once."""
    if not world.active:
        return fn()
    out, problem = None, None
    if world.main:
        try:
            out = fn()
        except RLAdaptError as exc:
            problem = exc
    out, message = broadcast_object((out, None if problem is None else str(problem)), world)
    if problem is not None:
        raise problem
    if message is not None:
        raise RLAdaptError(message)
    return out


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of ``t`` over ranks, in place (unchanged for one process)."""
    if world.active:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the incoming gradient: with every rank's loss computed from the
    same global sum, each rank's parameter gradient is then ``world.size`` times its own share, and the averaging
    of :func:`all_reduce_gradients` leaves exactly the gradient of the one global loss."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = t.clone()
        td.all_reduce(out, op=td.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous().clone()
        td.all_reduce(grad, op=td.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(t: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of ``t`` over ranks as a new tensor that carries gradients back to every rank's ``t`` (``t`` itself for
    one process). For losses of a global batch split over ranks, e.g. nnU-Net's batch Dice."""
    return _SumOverRanks.apply(t) if world.active else t


def all_reduce_gradients(params: Iterable[torch.Tensor], world: World, average: bool = True) -> None:
    """Sum (or average) the ``.grad`` of ``params`` over ranks, in one flat bucket per dtype and device.

    A parameter without a gradient on one rank takes part with zeros, so every rank sends the same bucket.
    """
    if not world.active:
        return
    params = [p for p in params if p.requires_grad]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        td.all_reduce(flat, op=td.ReduceOp.SUM)
        if average:
            flat /= world.size
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def broadcast_module(module: torch.nn.Module, world: World, src: int = 0) -> None:
    """Copy the parameters and buffers of ``module`` on rank ``src`` to every rank, in place."""
    if not world.active:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        td.broadcast(t.data, src=src)
