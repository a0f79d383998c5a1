"""``rl-adapt baseline``: test-time adaptation baselines (TENT, entropy minimisation, pseudo-labels)."""
from __future__ import annotations

import argparse
from pathlib import Path

from rl_adapt.commands import add_config_help


def register(sub) -> argparse.ArgumentParser:
    """Add the ``baseline`` subcommand to ``sub``."""
    p = sub.add_parser(
        "baseline",
        help="Test-time adaptation baselines (TENT, entropy minimisation, pseudo-labels).",
        description=(
            "Adapt a source nnU-Net model on unlabelled target images with a classic baseline and write a new "
            "nnU-Net results folder under OUT (the source is never written). tent: entropy minimisation of the "
            "normalisation layers' affine parameters only; entropy: the whole network; pseudo-label: rounds "
            "of self-training on confident pixels; styled-source: supervised fine-tuning on the source images "
            "(--source-data) restyled toward the target's look, estimated from the target images; harmonize: the source "
            "weights unchanged, with a map of the target images toward the source images' look (depth profile, "
            "spectrum, histogram; fitted on both sets' images, no label) stored with them and applied by predict and "
            "evaluate. The model folder is written when the run has finished; until then OUT/unfinished/ keeps "
            "the finished stages, and --resume continues a killed run from them. Budget knobs (steps, "
            "rounds, lr, batch_size, seed, confidence) are shared: see the table below."
        ),
    )
    p.add_argument("--method", required=True, choices=("tent", "entropy", "pseudo-label", "styled-source", "harmonize"))
    p.add_argument("--model", required=True, type=Path, help="source nnU-Net v2 results folder (read only)")
    p.add_argument("--target", required=True, type=Path, help="unlabelled target images (labels ignored)")
    p.add_argument("--out", required=True, type=Path, help="new output folder")
    p.add_argument("--source-data", type=Path,
                   help="source dataset (styled-source: its images restyled toward the target, its labels; "
                        "harmonize: its images)")
    p.add_argument("--config", type=Path, help="YAML with BaselineConfig fields")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set lr=0.001 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out without redoing its finished stages (the restyled "
                        "source pairs with their scanner fit, the training); same inputs, --config and --set. On a "
                        "finished run: prints its model folder and exits 0 (a requeued job succeeds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_help(p, _config_class, "Config keys (YAML file or --set KEY=VALUE), default and allowed values:")
    return p


def _config_class() -> type:
    from rl_adapt.evaluation.baselines import BaselineConfig

    return BaselineConfig


def run(args: argparse.Namespace) -> int:
    """Run the baseline; prints the model folder to pass to ``rl-adapt evaluate``."""
    from rl_adapt.preflight import check_existing, check_output

    inputs = {"--model": args.model, "--target": args.target, "--source-data": args.source_data,
              "--config": args.config}
    check_existing(inputs)
    if not args.resume:  # a resume is checked by run_baseline (which also refuses a finished folder)
        check_output(args.out, inputs, command="rl-adapt baseline",
                     exists_hint="choose a new output folder (models are never overwritten), or pass --resume to "
                                 "continue an interrupted run in it")

    from rl_adapt.config import load_config
    from rl_adapt.evaluation.baselines import BaselineConfig, run_baseline
    from rl_adapt.preflight import check_device

    cfg = load_config(BaselineConfig, args.config, [*args.overrides, f"method={args.method}"])
    check_device(cfg.device)
    folder = run_baseline(args.model, args.target, args.out, cfg, progress=not args.no_progress,
                          source_data=args.source_data, resume=args.resume)
    print(f"adapted model ({cfg.method}): {folder}")
    return 0
