"""``rl-adapt triage``: rank target patients by how implausible a model's masks are, label-free."""
from __future__ import annotations

import argparse

from rl_adapt.commands import add_segmentation_args


def register(sub) -> argparse.ArgumentParser:
    """Add the ``triage`` subcommand to ``sub``."""
    p = sub.add_parser(
        "triage",
        help="Rank target patients by how implausible a model's masks are (quality review, label-free).",
        description=(
            "Segments every target image with a model (raw outputs, nnU-Net's preprocessing and sliding window), "
            "runs the anatomical checks on each mask and ranks the patients by the number of checks their images "
            "fail. Writes OUT/patients.csv (rank, patient, images, invalid_images, failed_checks, cases) and "
            "OUT/images.csv (case, patient, valid, n_failed, failed_checks, blank: 1 for an image whose pixels are "
            "all one value), and prints the first --top patients: the outputs to review first. (To pick patients "
            "for expert masks for `rl-adapt adapt --expert`, a random sample did as well in our measurements.)"
        ),
    )
    add_segmentation_args(p, images_help="target images (folder or dataset)", out_help="output folder (must not exist)")
    p.add_argument("--top", type=int, default=10, help="patients to print (default 10)")
    return p


def run(args: argparse.Namespace) -> int:
    """Rank and write the two tables; nothing is written when reading or loading fails."""
    from rl_adapt.preflight import check_device, check_existing, check_option, check_output, warn_blank_images

    inputs = {"--model": args.model, "--images": args.images}
    check_existing(inputs)
    check_output(args.out, inputs, command="rl-adapt triage")
    check_option("--top", args.top, ge=1)
    device = str(check_device(args.device))

    from rl_adapt.data.readers import read_dataset
    from rl_adapt.evaluation.triage import image_rows, patient_ranking
    from rl_adapt.io_utils import atomic_dir, write_csv
    from rl_adapt.policies.nnunet import load_model_folder, resolve_model_folder

    model = load_model_folder(resolve_model_folder(args.model), device=device)
    cases = read_dataset(args.images, with_labels=False)
    blank = warn_blank_images(cases, "ranked anyway")
    masks = model.predict_cases(cases, progress=not args.no_progress)
    rows = image_rows([c.name for c in cases], [c.patient for c in cases], masks)
    for r in rows:
        r["blank"] = int(r["case"] in blank)
    ranking = patient_ranking(rows)
    with atomic_dir(args.out) as tmp:
        write_csv(tmp / "patients.csv", ranking)
        write_csv(tmp / "images.csv", rows)
    n_invalid = sum(1 - r["valid"] for r in rows)
    print(f"{len(rows)} images of {len(ranking)} patients; {n_invalid} masks fail at least one anatomical check")
    if blank:
        print(f"warning: {len(blank)} of {len(rows)} images are blank (every pixel the same value): their masks "
              "mean nothing (column blank in images.csv)")
    print(f"{'rank':>4}  {'patient':20s} {'invalid':>7} {'failed checks':>13}")
    for r in ranking[: args.top]:
        print(f"{r['rank']:>4}  {r['patient']:20s} {r['invalid_images']:>4}/{r['images']:<2} {r['failed_checks']:>13}")
    print(f"wrote {args.out / 'patients.csv'} and {args.out / 'images.csv'}")
    return 0
