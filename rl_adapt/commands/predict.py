"""``rl-adapt predict``: segment images with an nnU-Net v2 results folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from rl_adapt.commands import add_segmentation_args


def register(sub) -> argparse.ArgumentParser:
    """Add the ``predict`` subcommand to ``sub``."""
    p = sub.add_parser(
        "predict",
        help="Segment images with an nnU-Net v2 results folder.",
        description=(
            "Predicts every image of a folder or dataset (CAMUS, nnU-Net raw, image folder) with nnU-Net's "
            "preprocessing and sliding window, and writes one mask per image with the input geometry "
            "(OUT/<case>.nii.gz). When the model folder carries a postprocessing.json (nnU-Net's postprocessing, "
            "or the one an adaptation run decided), its steps are applied to every mask, as "
            "nnUNetv2_apply_postprocessing does; --postprocessing none writes the raw masks. When it carries a "
            "harmonization.npz (an adaptation run with harmonize.when, or `rl-adapt baseline --method harmonize`), "
            "every image is first mapped toward the source images' look with it (nnUNetv2_predict knows no such "
            "file: use this command for those folders). Checkpoints are pickles: load only models you trust."
        ),
    )
    add_segmentation_args(p, images_help="images to segment (folder or dataset)",
                          out_help="output folder for masks (must not exist)")
    p.add_argument("--folds", default="0", help="comma-separated folds to ensemble (default 0)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in fold_N/")
    p.add_argument("--mirror", action="store_true", help="test-time mirroring over the axes the model allows")
    p.add_argument("--postprocessing", default="auto", metavar="auto|none|FILE",
                   help="auto: the model folder's postprocessing.json if any; none: raw masks; or a postprocessing.json "
                        "(or nnU-Net's .pkl beside it)")
    return p


def run(args: argparse.Namespace) -> int:
    """Predict and write masks; nothing is written when loading fails."""
    from rl_adapt.errors import InputError
    from rl_adapt.preflight import check_device, check_existing, check_output, warn_blank_images

    post_file = None if args.postprocessing in ("auto", "none") else Path(args.postprocessing)
    inputs = {"--model": args.model, "--images": args.images, "--postprocessing": post_file}
    check_existing(inputs)
    check_output(args.out, inputs, command="rl-adapt predict")
    folds = tuple(int(f) if f.strip().isdigit() else f.strip() for f in args.folds.split(",") if f.strip())
    if not folds:
        raise InputError(None, f"--folds {args.folds!r}: give at least one fold, e.g. 0 or 0,1,2")
    device = str(check_device(args.device))

    from rl_adapt.data.readers import read_dataset
    from rl_adapt.data.writers import write_mask
    from rl_adapt.io_utils import atomic_dir
    from rl_adapt.policies.nnunet import load_model_folder, resolve_model_folder
    from rl_adapt.postprocessing import load_postprocessing

    folder = resolve_model_folder(args.model)
    model = load_model_folder(folder, folds=folds, device=device, checkpoint=args.checkpoint)
    post = None
    if args.postprocessing != "none":
        post = load_postprocessing(folder if post_file is None else post_file)
        if post is None and post_file is not None:
            raise InputError(post_file, "no postprocessing.json there")
    cases = read_dataset(args.images, with_labels=False)
    blank = warn_blank_images(cases)
    masks = model.predict_cases(cases, progress=not args.no_progress, mirror=args.mirror)
    if post is not None and post.steps:
        print(f"postprocessing: {post.describe()} (from {post.source})")
        masks = [post(m) for m in masks]
    with atomic_dir(args.out) as tmp:
        for case, mask in zip(cases, masks):
            write_mask(tmp / f"{case.name}.nii.gz", mask, like=case)
    print(f"wrote {len(cases)} masks to {args.out}")
    if blank:
        print(f"warning: {len(blank)} of {len(cases)} images are blank (every pixel the same value); their masks "
              "mean nothing")
    return 0
