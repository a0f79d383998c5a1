"""``rl-adapt adapt``: adapt a source nnU-Net model to unlabelled target images (RL4Seg loop)."""
from __future__ import annotations

import argparse
from pathlib import Path

from rl_adapt.commands import add_config_help


def register(sub) -> argparse.ArgumentParser:
    """Add the ``adapt`` subcommand to ``sub``."""
    p = sub.add_parser(
        "adapt",
        help="Adapt a source model to unlabelled target images with RL (RL4Seg).",
        description=(
            "N iterations of rollout -> correct -> reward network -> pixel-wise PPO. Writes the adapted model "
            "as a new nnU-Net results folder under OUT/model, the reward network, TensorBoard logs and "
            "per-stage metrics (OUT/metrics.jsonl). Target labels, if present, are never used."
        ),
    )
    p.add_argument("--model", required=True, type=Path, help="source nnU-Net v2 results folder (never written)")
    p.add_argument("--target", required=True, type=Path, help="unlabelled target images (folder or dataset)")
    p.add_argument("--out", required=True, type=Path, help="run folder (must not exist unless --resume)")
    p.add_argument("--source-data", type=Path,
                   help="labelled source dataset (what the model was trained on): its masks train the shape prior; "
                        "with source_teacher its images, restyled toward the target, teach the policy, the reward "
                        "and the guard. Every configs/adapt_*.yaml preset needs it")
    p.add_argument("--shape-prior", type=Path,
                   help="trained shape prior to reuse (shape_prior.pt of an earlier run on the same source data)")
    p.add_argument("--expert", type=Path, help="folder of expert-corrected masks named like the target cases")
    p.add_argument("--val", type=Path, help="labelled target set used only to report progress")
    p.add_argument("--config", type=Path, help="YAML config (e.g. configs/adapt_cpu.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set ppo.lr=1e-5 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (same inputs, --config and --set); on a finished one: "
                        "prints its model folder and exits 0")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_help(p, _config_class, "Config keys (YAML file or --set KEY=VALUE), default and allowed values:")
    return p


def _config_class() -> type:
    from rl_adapt.engine.loop import AdaptConfig

    return AdaptConfig


def run(args: argparse.Namespace) -> int:
    """Run or resume the adaptation; prints the adapted model folder."""
    from rl_adapt.preflight import check_existing, check_output

    inputs = {"--model": args.model, "--target": args.target, "--source-data": args.source_data,
              "--expert": args.expert, "--val": args.val, "--shape-prior": args.shape_prior}
    check_existing({**inputs, "--config": args.config})
    if not args.resume:  # a resumed run may read the config.yaml it wrote itself
        inputs["--config"] = args.config
    check_output(args.out, inputs, may_exist=args.resume, earlier_output=("config.yaml",), command="rl-adapt adapt",
                 exists_hint="choose a new run folder, or pass --resume to continue the run in it")

    from rl_adapt.config import load_config
    from rl_adapt.engine.loop import AdaptConfig, AdaptInputs, Adapter
    from rl_adapt.preflight import check_device

    cfg_path = args.config
    if args.resume and cfg_path is None and (args.out / "config.yaml").exists():
        cfg_path = args.out / "config.yaml"
    cfg = load_config(AdaptConfig, cfg_path, args.overrides)
    check_device(cfg.device)
    inputs = AdaptInputs(model_dir=args.model, target_dir=args.target, source_data=args.source_data,
                         expert_dir=args.expert, val_dir=args.val, shape_prior=args.shape_prior)
    adapter = Adapter(inputs, cfg, args.out, resume=args.resume, progress=not args.no_progress)
    folder = adapter.run()
    print(f"adapted model: {folder}")
    rejected = adapter.rejected_iterations()
    if rejected:
        same = " (all: the adapted network is the source network)" if len(rejected) == cfg.iterations else ""
        print(f"guard: PPO of iteration(s) {', '.join(map(str, rejected))} rejected{same}; see metrics.jsonl")
    print(f"metrics: {args.out / 'metrics.jsonl'}   tensorboard: tensorboard --logdir {args.out / 'tensorboard'}")
    return 0

