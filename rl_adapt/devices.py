"""Torch device and CPU-thread choices shared by the commands and the training loops."""
from __future__ import annotations

import os

import torch

from rl_adapt.errors import ConfigError, InputError


def pick_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; otherwise ``torch.device(name)``.

    :raises ConfigError: a name torch does not know (e.g. ``tpu``).
    :raises InputError: a CUDA device is asked for on a machine without CUDA (or with fewer devices).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, f"device {name!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(None, f"device {name!r} requested but this machine has {torch.cuda.device_count()} "
                                   "CUDA device(s)")
    return dev


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM allocation), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)
