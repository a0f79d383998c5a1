"""``rl-adapt evaluate``: score models on a labelled set; tables, summary.json and report.html."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to ``sub``."""
    p = sub.add_parser(
        "evaluate",
        help="Score models on a labelled set: metrics, anatomy, clinical indices, report.html.",
        description=(
            "Predict every labelled case with every model (nnU-Net sliding window, original geometry), then "
            "write OUT/per_image.csv, OUT/per_patient.csv, OUT/summary.json and OUT/report.html. The first "
            "--model is the reference of the paired comparisons. OUT is written atomically: on any error "
            "nothing is left behind."
        ),
    )
    p.add_argument("--model", dest="models", action="append", required=True, metavar="NAME=MODEL_DIR",
                   help="an nnU-Net v2 results folder, named (repeatable; the first is the reference)")
    p.add_argument("--data", required=True, type=Path, help="labelled dataset (CAMUS, nnU-Net raw, or folder)")
    p.add_argument("--out", required=True, type=Path, help="new output folder")
    p.add_argument("--reward", type=Path, help="adaptation run folder (or reward_net.pt): reward-net reliability")
    p.add_argument("--reward-model", default="",
                   help="the model (NAME of --model) whose masks the reward network scores (default: the first)")
    p.add_argument("--compare", action="append", default=[], metavar="NAME:REFERENCE",
                   help="also compare NAME with REFERENCE, paired on the same images (repeatable; e.g. "
                        "rl_adapted:styled-source); every model is compared with the first in any case")
    p.add_argument("--mirror", action="store_true", help="test-time mirroring (slower)")
    p.add_argument("--overlays", type=int, default=4, metavar="N", help="cases per overlay group in the report (>= 0)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:N; checked before any work)")
    p.add_argument("--workers", type=int, default=-1,
                   help="metric processes running alongside prediction (-1: auto, 0: none, all in this process; >= -1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for prediction (0: torch's default; >= 0)")
    p.add_argument("--postprocessing", default="auto", metavar="auto|none|FILE",
                   help="rule applied to every model besides the raw outputs: auto = the postprocessing.json the "
                        "model folders carry (they must agree), none, or a postprocessing.json (or nnU-Net's .pkl "
                        "beside it) / model folder")
    p.add_argument("--no-report", action="store_true", help="tables and summary only")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT that holds an earlier evaluation (summary.json and inputs.json); "
                        "no other folder is ever replaced")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation in --out: the models whose predictions it finished are "
                        "not predicted again (same --model, --data and --mirror). On a finished one with the same "
                        "settings: prints its table and exits 0, nothing redone")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the evaluation and print a short table."""
    from rl_adapt.config import check_value
    from rl_adapt.evaluation.evaluate import EvaluateConfig, evaluate
    from rl_adapt.evaluation.inputs import parse_model_specs
    from rl_adapt.preflight import check_existing

    specs = parse_model_specs(args.models)
    post_file = None if args.postprocessing in ("auto", "none") else Path(args.postprocessing)
    check_existing({"--data": args.data, **{f"--model {n}": p for n, p in specs.items()}, "--reward": args.reward,
                    "--postprocessing": post_file})
    for flag, name, value in (("--overlays", "overlays", args.overlays), ("--workers", "workers", args.workers),
                              ("--threads", "torch_threads", args.threads)):
        check_value(EvaluateConfig, name, value, flag)
    cfg = EvaluateConfig(mirror=args.mirror, overlays=args.overlays, device=args.device, workers=args.workers,
                         torch_threads=args.threads, postprocessing=args.postprocessing, report=not args.no_report,
                         reward_model=args.reward_model, compare=list(args.compare))
    summary = evaluate(specs, args.data, args.out, reward=args.reward, config=cfg,  # checks OUT and the device first
                       overwrite=args.overwrite, progress=not args.no_progress, resume=args.resume)
    print(format_table(summary))
    for warning in summary.get("warnings", {}).values():
        if isinstance(warning, dict) and warning.get("count") and warning.get("message"):
            print(f"warning: {warning['message']}")
    print(f"wrote {args.out / 'summary.json'}" + ("" if args.no_report else f" and {args.out / 'report.html'}"))
    return 0


def format_table(summary: dict) -> str:
    """Plain-text table: mean Dice, HD95, validity, EF MAE per model and the paired differences."""
    def f(x, d=3):
        return "   –  " if x is None else f"{x:.{d}f}"

    def block(s: dict) -> list[str]:
        out = [f"{'model':<20} {'Dice':>6} {'HD95':>7} {'valid':>7} {'EF MAE':>7}"]
        for name, e in s["models"].items():
            v = e["validity_rate"]
            out.append(f"{name[:20]:<20} {f(e['dice']['mean'])} {f(e['hd95']['mean'], 2):>7} "
                       f"{('   –' if v is None else f'{100 * v:5.1f}%'):>7} {f(e['ef_mae'], 2):>7}")
        for key, st in s.get("paired", {}).items():
            lo, hi = st["ci95"]
            out.append(f"{key}: dDice {f(st['dice_mean_diff'], 4)} [{f(lo, 4)}, {f(hi, 4)}], "
                       f"Wilcoxon p={'–' if st['wilcoxon_p'] is None else format(st['wilcoxon_p'], '.3g')}")
        return out

    lines = [f"{summary['n_images']} images, {summary['n_patients']} patients"]
    if summary.get("harmonized_inputs"):
        lines.append(f"images harmonized toward the source look (harmonization.npz) before: "
                     f"{', '.join(summary['harmonized_inputs'])}")
    if summary.get("postprocessed"):
        lines.append("raw network outputs:")
    lines += block(summary)
    if summary.get("postprocessed"):
        lines.append(f"postprocessed, every model the same way ({summary['postprocessing']['rule']}):")
        lines += block(summary["postprocessed"])
    if summary.get("reward"):
        r = summary["reward"]
        lines.append(f"reward network vs the true labels ({r['model']}'s outputs): AUROC {f(r['auroc'])}, "
                     f"ECE {f(r['ece'])}; within {r['border_px']} px of a border: AUROC {f(r['border_auroc'])}, "
                     f"ECE {f(r['border_ece'])}")
        if r.get("confidence_border_auroc") is not None:
            lines.append(f"  the model's own softmax confidence on the same pixels: AUROC {f(r['confidence_auroc'])}; "
                         f"within {r['border_px']} px of a border: AUROC {f(r['confidence_border_auroc'])}")
    return "\n".join(lines)
