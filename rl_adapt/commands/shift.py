"""``rl-adapt shift``: view an existing (real) dataset through a synthetic target vendor.

Used to build a realistic domain-shift experiment on real CAMUS images: the source model is trained on
the original images, then adapted to (and evaluated on) other patients' images re-rendered with a target
vendor's look (gain/dynamic range, speckle, blur, clutter, shadows; geometry changes move labels too).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    """Add the ``shift`` subcommand to ``sub``."""
    p = sub.add_parser("shift", help="Apply a synthetic target-vendor shift to a dataset (e.g. real CAMUS).",
                       description=__doc__)
    p.add_argument("--data", required=True, type=Path, help="input dataset (any reader format)")
    p.add_argument("--preset", required=True,
                   help="target vendor preset, e.g. target-blur; 'none' keeps the images (subset / label repair)")
    p.add_argument("--out", required=True, type=Path, help="output nnU-Net raw dataset folder")
    p.add_argument("--split-file", type=Path,
                   help="JSON file mapping split names to case lists (e.g. splits_official.json)")
    p.add_argument("--split", help="which split of --split-file to keep (e.g. val)")
    p.add_argument("--no-labels", action="store_true", help="write images only (an unlabelled target set)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image shift randomness")
    p.add_argument("--repair-labels", action="store_true",
                   help="undo label-value interpolation artefacts of resized label maps (e.g. CAMUS224)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (one log line when done), as for the other long-running commands")
    return p


def select_cases(cases, split_file: Path | None, split: str | None):
    """Keep the cases listed under ``split`` in ``split_file`` (all cases when no file is given)."""
    from rl_adapt.errors import InputError

    if split_file is None:
        return cases
    try:
        splits = json.loads(Path(split_file).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(split_file, f"cannot read split file ({exc})") from exc
    if split not in splits:
        raise InputError(split_file, f"split {split!r} not found; available: {sorted(splits)}")
    wanted = set(splits[split])
    kept = [c for c in cases if c.name in wanted]
    if not kept:
        raise InputError(split_file, f"no case of split {split!r} is in the dataset")
    return kept


def preflight(args: argparse.Namespace) -> None:
    """Everything ``run`` can check before reading the dataset: split options, preset, seed, output folder."""
    from rl_adapt.errors import ConfigError
    from rl_adapt.preflight import check_existing, check_option, check_output
    from rl_adapt.synth.vendors import get_preset

    if args.split is not None and args.split_file is None:
        raise ConfigError(f"--split {args.split}: needs --split-file (the JSON file listing the cases of each "
                          "split); without it every case would be written")
    if args.split_file is not None and args.split is None:
        raise ConfigError(f"--split-file {args.split_file}: needs --split (which split to keep)")
    if args.preset != "none":
        get_preset(args.preset)
    check_option("--seed", args.seed, ge=0)
    check_existing({"--data": args.data, "--split-file": args.split_file})
    check_output(args.out, {"--data": args.data, "--split-file": args.split_file}, command="rl-adapt shift")


def run(args: argparse.Namespace) -> int:
    """Read, shift and write the dataset (atomically)."""
    from tqdm import tqdm

    from rl_adapt.data.case import Case
    from rl_adapt.data.readers import read_dataset
    from rl_adapt.data.writers import write_nnunet_raw
    from rl_adapt.data.label_repair import remove_resize_artefacts
    from rl_adapt.synth.domains import apply_vendor_shift, shifted_spacing

    preflight(args)
    cases = select_cases(read_dataset(args.data), args.split_file, args.split)
    shifted = []
    for i, case in enumerate(tqdm(cases, desc=f"shift {args.preset}", disable=True if args.no_progress else None)):
        label = case.label
        if args.repair_labels and label is not None:
            label = remove_resize_artefacts(label)
        image, spacing = case.image, case.spacing
        if args.preset != "none":
            image, label = apply_vendor_shift(image, args.preset, seed=args.seed * 100003 + i, label=label)
            spacing = shifted_spacing(spacing, args.preset)
        shifted.append(Case(name=case.name, image=image, label=None if args.no_labels else label,
                            spacing=spacing, meta=dict(case.meta, vendor=args.preset), source=case.source))
    write_nnunet_raw(shifted, args.out, dataset_name=args.out.name, labelled=not args.no_labels)
    print(f"{len(shifted)} cases written to {args.out}")
    return 0
