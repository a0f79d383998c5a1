"""``rl-adapt pretrain``: train a source nnU-Net v2 model on a labelled nnU-Net raw dataset."""
from __future__ import annotations

import argparse
from pathlib import Path

from rl_adapt.commands import add_config_help


def register(sub) -> argparse.ArgumentParser:
    """Add the ``pretrain`` subcommand to ``sub``."""
    p = sub.add_parser(
        "pretrain",
        help="Train a source nnU-Net v2 model (nnU-Net results-folder layout).",
        description=(
            "Plans with nnU-Net's own planner (2D; configs/pretrain_cpu.yaml shrinks the network for CPUs), "
            "trains with Dice + cross-entropy and echo augmentation (no flips), reports held-out Dice per "
            "structure and writes OUT/<Dataset>/nnUNetTrainer__<Plans>__2d/ (plans.json, dataset.json, "
            "fold_0/checkpoint_final.pth, fold_0/tensorboard), loadable by nnUNetv2_predict. The model folder "
            "appears when training has finished; until then OUT/unfinished_pretrain/ holds a checkpoint of the last "
            "finished epoch (train.checkpoint_every), and the same command with --resume continues a killed run "
            "from it."
        ),
    )
    p.add_argument("--data", required=True, type=Path, help="labelled nnU-Net raw dataset (dataset.json, imagesTr, labelsTr)")
    p.add_argument("--out", required=True, type=Path,
                   help="results folder to write (an nnUNet_results-style root: new, or existing without this "
                        "dataset's model)")
    p.add_argument("--config", type=Path, help="YAML config (configs/pretrain_cpu.yaml or configs/pretrain_gpu.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--val-fraction", type=float, help="fraction of patients held out (overrides train.val_fraction)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of this model under --out from its last epoch checkpoint "
                        "(same --data, --config and --set; a new run if there is none). On a finished one: prints its "
                        "result and exits 0")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_help(p, _config_class, "Config keys (YAML file or --set KEY=VALUE), default and allowed values:")
    return p


def _config_class() -> type:
    from rl_adapt.training.pretrain import PretrainConfig

    return PretrainConfig


def run(args: argparse.Namespace) -> int:
    """Train and export; prints the model folder and the held-out Dice."""
    from rl_adapt.preflight import check_existing, check_output

    check_existing({"--data": args.data, "--config": args.config})
    check_output(args.out, {"--data": args.data, "--config": args.config}, may_exist=True,
                 command="rl-adapt pretrain")

    from rl_adapt.config import load_config
    from rl_adapt.errors import InputError
    from rl_adapt.preflight import check_device
    from rl_adapt.training.pretrain import PretrainConfig, fold_folder, pretrain

    overrides = list(args.overrides)
    if args.val_fraction is not None:
        overrides.append(f"train.val_fraction={args.val_fraction}")
    cfg = load_config(PretrainConfig, args.config, overrides)
    check_device(cfg.train.device)
    target = fold_folder(args.data, args.out, cfg)
    if target.exists() and not args.resume:  # a resume of a finished run is checked (and answered) by pretrain
        raise InputError(target, "already exists; choose another --out")
    res = pretrain(args.data, args.out, cfg, progress=not args.no_progress, resume=args.resume)
    print(f"model: {res.model_dir}")
    if res.dice:
        per = "  ".join(f"{k} {v:.3f}" for k, v in res.dice.items() if k != "mean")
        print(f"held-out Dice ({res.n_val} cases): mean {res.dice['mean']:.3f}  {per}")
    print(f"time: {res.seconds:.0f} s   tensorboard: tensorboard --logdir {res.model_dir / f'fold_{cfg.train.fold}' / 'tensorboard'}")
    return 0
