"""``rl-adapt demo``: the whole pipeline, offline, on synthetic data (the README's main-job command)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``sub``."""
    p = sub.add_parser(
        "demo",
        help="The whole pipeline offline on synthetic data, with a report.",
        description=(
            "Synthesise a source and a shifted target domain, pretrain a small source nnU-Net, adapt it with "
            "RL, run the TENT and pseudo-label baselines, evaluate all models on a labelled target test split "
            "and write OUT/eval/report.html. Re-running with the same OUT resumes where it stopped."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("results/runs/demo"), help="demo folder")
    p.add_argument("--config", type=Path, help="DemoConfig YAML (default configs/demo.yaml)")
    p.add_argument("--full", action="store_true",
                   help="reference scale (220 target test patients, default nnU-Net plan): configs/demo_full.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one DemoConfig value, e.g. --set target_domain=target-shadow")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the summary table and where the report is."""
    from rl_adapt.commands.evaluate import format_table
    from rl_adapt.config import load_config
    from rl_adapt.demo import DemoConfig, _config_path, run_demo

    cfg_path = args.config or _config_path("configs/demo_full.yaml" if args.full else "configs/demo.yaml")
    cfg = load_config(DemoConfig, cfg_path, args.overrides)
    result = run_demo(cfg, args.out, progress=not args.no_progress)
    if "evaluate" not in result["ran"]:  # the evaluate stage prints the table when it runs
        print(format_table(result["summary"]))
    print("stage seconds: " + ", ".join(f"{k} {v}" for k, v in result["timings"].items()))
    print(f"report: {Path(result['eval_dir']) / 'report.html'}")
    return 0
