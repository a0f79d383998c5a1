"""Torch device choice shared by the commands and the training loops."""
from __future__ import annotations

import torch

from rl_adapt.errors import InputError


def pick_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; otherwise ``torch.device(name)``.

    :raises InputError: a CUDA device is asked for on a machine without CUDA.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, f"device {name!r} requested but CUDA is not available")
    return dev
