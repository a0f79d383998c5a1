"""``rl-adapt`` command line: one subcommand per module in :mod:`rl_adapt.commands`.

Each command module defines ``register(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
Modules are imported lazily so that ``rl-adapt info`` does not pay for torch. Every
:class:`~rl_adapt.errors.RLAdaptError` becomes one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from rl_adapt.commands import CommandParser
from rl_adapt.errors import RLAdaptError

COMMANDS = {
    "synth": "Generate synthetic apical 2CH/4CH echo domains (source and shifted target vendors).",
    "info": "List the cases of a dataset (CAMUS 2023/2019, nnU-Net raw, or an image folder).",
    "shift": "Apply a synthetic target-vendor shift to a dataset (e.g. real CAMUS images).",
    "pretrain": "Train a source nnU-Net v2 model (nnU-Net results-folder layout).",
    "predict": "Segment images with an nnU-Net v2 results folder.",
    "triage": "Rank target patients by how implausible a model's masks are (quality review, label-free).",
    "adapt": "Adapt a source model to unlabelled target images with RL (RL4Seg).",
    "evaluate": "Score models on a labelled set: metrics, anatomy, clinical indices, report.html.",
    "baseline": "Test-time adaptation baselines (TENT, entropy minimisation, pseudo-labels).",
    "demo": "The whole pipeline offline on synthetic data, with a report.",
}


def _module(name: str):
    return importlib.import_module(f"rl_adapt.commands.{name.replace('-', '_')}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the chosen subcommand's module is imported."""
    parser = argparse.ArgumentParser(
        prog="rl-adapt",
        description="Adapt an nnU-Net echocardiography segmentation model to a new centre with RL, and prove the gain.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    chosen = next((a for a in (argv or []) if a in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        if name == chosen:
            try:
                _module(name).register(sub)
            except ModuleNotFoundError:
                sub.add_parser(name, help=help_text + " (not available in this build)")
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rl-adapt`` script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    # Batch jobs (--no-progress) get stage and epoch log lines instead of bars; interactive runs stay quiet.
    quiet = logging.INFO if getattr(args, "no_progress", False) else logging.WARNING
    level = {0: quiet, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    if not args.command:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        parser.print_help()
        return 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: join the job (imports torch only then)
        return _run_data_parallel(args, level)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return _run(args)


DATA_PARALLEL = ("adapt", "evaluate", "pretrain")
"""Commands that run data-parallel under ``torchrun`` (the others refuse a multi-process job)."""


def _run_data_parallel(args: argparse.Namespace, level: int) -> int:
    """Run a command as one rank of a ``torchrun`` job: rank 0 logs and prints, every rank computes its share."""
    from rl_adapt import distributed

    if args.command not in DATA_PARALLEL:
        if os.environ.get("RANK", "0") == "0":
            print(f"rl-adapt {args.command}: error: runs in one process; only {', '.join(DATA_PARALLEL)} run "
                  "data-parallel under torchrun", file=sys.stderr)
        return 2
    world = distributed.setup("auto")
    logging.basicConfig(level=level if world.main else logging.WARNING,
                        format=f"%(levelname)s [rank {world.rank}] %(name)s: %(message)s")
    if not world.main:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints the command's result
    code = 1
    try:
        code = _run(args)
        return code
    finally:
        distributed.teardown(world, clean=code == 0)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(_module(args.command).run(args) or 0)
    except RLAdaptError as exc:
        print(f"rl-adapt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"rl-adapt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = getattr(args, "resume", None) is not None and getattr(args, "out", None) is not None and \
            Path(args.out).exists()  # finished stages (or epochs) were kept
        print(f"rl-adapt {args.command}: interrupted" + ("; the same command with --resume continues from what "
                                                         f"{args.out} kept" if kept else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
