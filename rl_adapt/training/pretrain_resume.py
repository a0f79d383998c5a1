"""Resumable pretraining: the folder of an unfinished ``rl-adapt pretrain`` run and its epoch checkpoint.

While a source model trains, ``OUT/unfinished_pretrain/<Dataset>__<Trainer>__<Plans>__2d__fold_F/`` holds

* ``settings.json``: what the run was started with (its config, the dataset, the number of processes), so that a
  resume with other settings is refused, naming the keys that differ;
* ``checkpoint.pt``: written atomically after every ``train.checkpoint_every`` epochs: the network and optimizer
  states, the batch generator's and torch's random states, the epochs done and their records (the role of nnU-Net's
  ``checkpoint_latest.pth``);
* ``tensorboard/``: the run's event files (a resumed run appends to them).

The model folder ``OUT/<Dataset>/<Trainer>__<Plans>__2d/fold_F`` is exported only when training has finished, as
before, so an evaluator never finds a half-trained model; then the unfinished folder is removed. A run killed at
any moment resumes (``rl-adapt pretrain ... --resume``) from its last checkpoint and, on CPU with the same thread
count, ends with the weights an uninterrupted run ends with (each epoch's batches and augmentation come from the
saved generator state).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rl_adapt.config import config_sha, differences
from rl_adapt.engine.run_state import without_keys
from rl_adapt.errors import InputError, RLAdaptError
from rl_adapt.io_utils import read_json, save_torch, write_json_atomic

log = logging.getLogger(__name__)

UNFINISHED_ROOT = "unfinished_pretrain"
"""The folder under the results root (``--out``) that holds unfinished runs (not a ``Dataset...`` name, so nnU-Net's
dataset lookup in an nnUNet_results root never sees it)."""
CHECKPOINT = "checkpoint.pt"
SETTINGS = "settings.json"

IGNORED_KEYS = ("train.device", "train.num_threads", "train.checkpoint_every")
"""Settings a resume may change: where, on how many threads and how often it checkpoints, not what it trains (a
resume on other hardware or another thread count is not bit-identical, but trains the same run)."""



def what_it_trains(settings: dict) -> dict:
    """``settings`` without :data:`IGNORED_KEYS`: what a resume, or a finished run's record, must match."""
    return without_keys(settings, tuple(f"config.{k}" for k in IGNORED_KEYS))

def unfinished_folder(out_dir: str | Path, dataset: str, model_folder_name: str, fold: int) -> Path:
    """Where an unfinished run keeps its work:
    ``out_dir/unfinished_pretrain/<dataset>__<model folder>__fold_<fold>``."""
    return Path(out_dir) / UNFINISHED_ROOT / f"{dataset}__{model_folder_name}__fold_{fold}"


@dataclass
class PretrainCheckpoint:
    """The state of a pretraining run after ``epochs_done`` epochs."""
    epochs_done: int
    """Epochs finished."""
    network: dict[str, torch.Tensor]
    """The training network's state dict (with deep supervision if trained with it), on CPU."""
    optimizer: dict[str, Any]
    """The optimizer's state dict."""
    generator: torch.Tensor
    """``torch.Generator.get_state()`` of the batch/augmentation generator."""
    torch_rng: torch.Tensor
    """``torch.get_rng_state()``."""
    history: list[dict] = field(default_factory=list)
    """Per-epoch records so far (loss, lr, seconds, dice when evaluated)."""
    dice: dict[str, float] = field(default_factory=dict)
    """The last held-out Dice."""
    seconds: float = 0.0
    """Wall time of the run up to this checkpoint (every process that worked on it), seconds."""

    def save(self, path: Path) -> None:
        """Write the checkpoint to ``path`` atomically."""
        save_torch(path, {"version": 1, **self.__dict__})

    @classmethod
    def load(cls, path: Path) -> "PretrainCheckpoint":
        """Read a checkpoint written by :meth:`save`.

        :raises InputError: the file cannot be read as one (e.g. a disk that filled up under an earlier run).
        """
        try:
            data = torch.load(path, map_location="cpu", weights_only=False)
            data.pop("version")
            return cls(**data)
        except Exception as exc:  # noqa: BLE001  (any unreadable file: one clear message)
            raise InputError(path, f"unreadable pretraining checkpoint ({type(exc).__name__}: {exc}); delete its "
                                   "folder to start the run again") from exc


def open_unfinished(folder: Path, settings: dict, resume: bool) -> PretrainCheckpoint | None:
    """The checkpoint to continue from in ``folder``, if any, for a run with ``settings``.

    A folder without a checkpoint (a run killed before its first one) holds nothing to continue: it is cleared and
    the run starts anew. A checkpoint is continued only with ``resume`` and the same settings (but for
    :data:`IGNORED_KEYS`).

    :param settings: ``{"config": to_dict(cfg), "data": str, "processes": int}``.
    :raises InputError: a checkpoint exists without ``resume`` (naming the epochs it holds), or the checkpoint or
        its settings file cannot be read.
    :raises RLAdaptError: the checkpoint's run was started with other settings (the keys that differ are named).
    """
    if not (folder / CHECKPOINT).is_file():
        if folder.exists():
            shutil.rmtree(folder)
        if resume:
            log.info("%s: nothing to resume, starting a new pretraining", folder)
        return None
    ckpt = PretrainCheckpoint.load(folder / CHECKPOINT)
    done = f"{ckpt.epochs_done} of {settings['config']['train']['epochs']} epochs done"
    if not resume:
        raise InputError(folder, f"an unfinished pretraining of this model is here ({done}): pass --resume to "
                                 "continue it, or delete the folder to start again")
    try:
        then = read_json(folder / SETTINGS)
    except (OSError, ValueError) as exc:
        raise InputError(folder / SETTINGS, f"unreadable ({exc}); delete the folder to start again") from exc
    a, b = what_it_trains(then), what_it_trains(settings)
    if config_sha(a) != config_sha(b):
        diff = [d.removeprefix("config.") for d in differences(a, b)]
        raise RLAdaptError(f"{folder}: this pretraining was started with other settings ("
                           + "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
                           + "); resume it with the same --data, --config and --set, or delete the folder")
    log.info("resuming the pretraining in %s (%s)", folder, done)
    return ckpt


def save_checkpoint(folder: Path, ckpt: PretrainCheckpoint, settings: dict) -> None:
    """Write ``ckpt`` into ``folder`` (atomically), with the run's ``settings`` beside it the first time."""
    if not (folder / SETTINGS).is_file():
        write_json_atomic(folder / SETTINGS, settings)
    ckpt.save(folder / CHECKPOINT)


def discard_if_empty(folder: Path) -> None:
    """Remove ``folder`` when it holds no checkpoint (a run that failed before its first epoch left no work)."""
    if folder.exists() and not (folder / CHECKPOINT).is_file():
        remove_unfinished(folder)


def remove_unfinished(folder: Path) -> None:
    """Remove a finished run's ``folder`` and, when it was the last one, ``unfinished_pretrain/`` itself."""
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()
    except OSError:
        pass  # other unfinished runs (or anything else) are still there


__all__ = ["PretrainCheckpoint", "unfinished_folder", "open_unfinished", "save_checkpoint", "discard_if_empty",
           "remove_unfinished", "UNFINISHED_ROOT"]
