"""``rl-adapt synth``: write a synthetic echo domain in the CAMUS 2023 or nnU-Net raw layout."""
from __future__ import annotations

import argparse
import logging
import time

log = logging.getLogger(__name__)

MAX_SIZE = 4096
"""Largest ``--size``: a bigger synthetic image only costs memory."""


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``synth`` subcommand."""
    from rl_adapt.synth.vendors import VENDORS

    p = subparsers.add_parser(
        "synth", help="Generate synthetic apical 2CH/4CH echo domains (source and shifted target vendors).",
        description="Generate N synthetic patients (2CH/4CH x ED/ES each, exact labels, ground-truth EF) "
                    "rendered by one scanner preset. Domains: " + "; ".join(
                        f"{k}: {v.description}" for k, v in VENDORS.items()))
    p.add_argument("--domain", default="source", help=f"scanner preset ({', '.join(VENDORS)})")
    p.add_argument("--patients", type=int, default=20, help="number of patients (4 images each; >= 1)")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--format", choices=("camus", "nnunet"), default="camus",
                   help="camus: CAMUS 2023 NIfTI layout; nnunet: nnU-Net v2 raw dataset")
    p.add_argument("--seed", type=int, default=0, help="anatomy of patient k depends on (seed, k) only (>= 0)")
    p.add_argument("--size", type=int, default=128, help=f"image side in pixels (32 to {MAX_SIZE})")
    p.add_argument("--no-labels", action="store_true",
                   help="write images only (nnunet: imagesTs; camus: no _gt files)")
    p.add_argument("--first-patient", type=int, default=1, help="number of the first patient (>= 0)")
    p.add_argument("--dataset-name", default=None,
                   help="nnU-Net dataset name for dataset.json (default: the output folder name)")
    return p


def run(args: argparse.Namespace) -> int:
    """Generate and write; every file appears at once (atomic output folder)."""
    from pathlib import Path

    from rl_adapt.data.writers import write_camus, write_nnunet_raw
    from rl_adapt.preflight import check_option, check_output
    from rl_adapt.synth.domains import generate_domain
    from rl_adapt.synth.vendors import get_preset

    get_preset(args.domain)  # unknown domain -> clear error before anything else
    check_option("--patients", args.patients, ge=1)
    check_option("--size", args.size, ge=32, le=MAX_SIZE)
    check_option("--seed", args.seed, ge=0)
    check_option("--first-patient", args.first_patient, ge=0)
    out = check_output(Path(args.out), command="rl-adapt synth")
    t0 = time.perf_counter()
    cases = generate_domain(args.domain, args.patients, seed=args.seed, size=args.size,
                            first_patient=args.first_patient, progress=True)
    if args.no_labels:
        for c in cases:
            c.label = None
    if args.format == "nnunet":
        write_nnunet_raw(cases, out, dataset_name=args.dataset_name or out.name, labelled=not args.no_labels)
    else:
        write_camus(cases, out)
    print(f"wrote {len(cases)} {args.domain} cases ({args.patients} patients, {args.format} layout) to {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
