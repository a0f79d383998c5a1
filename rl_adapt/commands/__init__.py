"""Subcommands of the rl-adapt CLI (one module each: register(subparsers), run(args)).

Every command checks what it can before any work (:mod:`rl_adapt.preflight`): its output folder, its device, its
configuration values. Those checks come before the heavy imports (torch, nnU-Net) where they can.
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Callable


class CommandParser(argparse.ArgumentParser):
    """The parser of one subcommand: its ``--help`` may end with the fields of a config dataclass, built only
    when the help is shown (the classes live in modules that import torch)."""

    config_help: Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.config_help is not None and self.epilog is None:
            self.epilog = self.config_help()
        return super().format_help()


class HelpFormatter(argparse.HelpFormatter):
    """Wraps paragraphs of prose (separated by a blank line) to the terminal width; keeps paragraphs whose lines
    are indented as written (the config table of :func:`add_config_help`)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in text.strip("\n").split("\n\n"):
            if any(line[:1].isspace() for line in para.splitlines()):
                out.append("\n".join(indent + line for line in para.splitlines()))
            else:
                out.append(super()._fill_text(para, width, indent))
        return "\n\n".join(out)


def add_config_help(p: argparse.ArgumentParser, config_class: Callable[[], type], intro: str) -> None:
    """End ``p``'s ``--help`` with every field of a config dataclass: ``key = default  [allowed]  doc``.

    :param config_class: returns the dataclass (called only when the help is shown).
    :param intro: one sentence before the table (how the values are set).
    """
    from rl_adapt.config import describe_fields

    p.formatter_class = HelpFormatter
    if isinstance(p, CommandParser):
        p.config_help = lambda: intro + "\n\n" + textwrap.indent(describe_fields(config_class()), "  ")
    else:  # a parser built elsewhere: the table now
        p.epilog = intro + "\n\n" + textwrap.indent(describe_fields(config_class()), "  ")


def add_segmentation_args(p: argparse.ArgumentParser, images_help: str, out_help: str) -> None:
    """``--model``, ``--images``, ``--out``, ``--device``, ``--no-progress``: the arguments of the commands that
    segment a set of images with one model folder (``predict``, ``triage``)."""
    p.add_argument("--model", required=True, type=Path,
                   help="model folder (<Dataset>/<Trainer>__<Plans>__2d) or a results root holding exactly one")
    p.add_argument("--images", required=True, type=Path, help=images_help)
    p.add_argument("--out", required=True, type=Path, help=out_help)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

