"""Subcommands of the rl-adapt CLI (one module each: register(subparsers), run(args))."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_segmentation_args(p: argparse.ArgumentParser, images_help: str, out_help: str) -> None:
    """``--model``, ``--images``, ``--out``, ``--device``, ``--no-progress``: the arguments of the commands that
    segment a set of images with one model folder (``predict``, ``triage``)."""
    p.add_argument("--model", required=True, type=Path,
                   help="model folder (<Dataset>/<Trainer>__<Plans>__2d) or a results root holding exactly one")
    p.add_argument("--images", required=True, type=Path, help=images_help)
    p.add_argument("--out", required=True, type=Path, help=out_help)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def refuse_existing(out: Path) -> None:
    """Raise :class:`~rl_adapt.errors.InputError` when the output folder ``out`` exists (no partial overwrite)."""
    from rl_adapt.errors import InputError

    if out.exists():
        raise InputError(out, "already exists; choose a new output folder")
