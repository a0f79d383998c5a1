"""``rl-adapt info``: what a dataset folder holds (format, cases, views, phases, spacing, labels, EF)."""
from __future__ import annotations

import argparse
import time
from collections import Counter


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``info`` subcommand."""
    p = subparsers.add_parser(
        "info", help="List the cases of a dataset (CAMUS 2023/2019, nnU-Net raw, or an image folder).",
        description="Read every case of a dataset (format auto-detected), check it, and print a table: "
                    "case, view, phase, size, spacing, labelled, EF.")
    p.add_argument("path", help="dataset folder (CAMUS 2023/2019, nnU-Net raw, or a folder of images)")
    p.add_argument("--no-labels", action="store_true", help="do not read label maps")
    p.add_argument("--summary", action="store_true", help="print only the summary lines, not the table")
    return p


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def format_table(cases) -> list[str]:
    """One line per case: case, view, phase, size, spacing, labelled, EF."""
    rows = [("case", "view", "phase", "size", "spacing_mm", "labelled", "EF")]
    for c in cases:
        rows.append((c.name, _fmt(c.view), _fmt(c.phase), f"{c.shape[0]}x{c.shape[1]}",
                     f"{c.spacing[0]:.3g}x{c.spacing[1]:.3g}", "yes" if c.label is not None else "no",
                     _fmt(c.meta.get("EF"), ".1f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def run(args: argparse.Namespace) -> int:
    """Read the dataset and print its table and summary."""
    from rl_adapt.data.readers import detect_format, read_dataset

    fmt = detect_format(args.path)
    t0 = time.perf_counter()
    cases = read_dataset(args.path, with_labels=not args.no_labels, progress=True, fmt=fmt)
    dt = time.perf_counter() - t0
    if not args.summary:
        print("\n".join(format_table(cases)))
    views = Counter(c.view or "?" for c in cases)
    phases = Counter(c.phase or "?" for c in cases)
    patients = {c.patient for c in cases if c.patient}
    n_lab = sum(c.label is not None for c in cases)
    splits = Counter(c.meta.get("split") for c in cases if c.meta.get("split"))
    print(f"format: {fmt}  cases: {len(cases)}  patients: {len(patients) or '-'}  labelled: {n_lab}  "
          f"read in {dt:.1f} s")
    line = "views: " + ", ".join(f"{k} {v}" for k, v in sorted(views.items()))
    line += "  phases: " + ", ".join(f"{k} {v}" for k, v in sorted(phases.items()))
    if splits:
        line += "  splits: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items()))
    print(line)
    return 0
