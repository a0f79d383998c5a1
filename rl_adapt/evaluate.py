"""Score segmentation models on a labelled set: metrics, anatomical validity, clinical indices.

:func:`evaluate` runs every model on every labelled case (sliding window, original geometry) and writes,
into a new folder (built in a temporary sibling and renamed at the end, so a failure leaves nothing):

* ``per_image.csv`` -- one row per (case, model): case, patient, view, phase, model, ``<S>_<metric>`` for
  S in LV/MYO/LA/epi and metric in dice/hd/hd95/assd (mm), ``mean_<metric>`` (mean over LV/MYO/LA),
  ``valid``, ``failed_checks`` (``;``-joined) and one ``check_<name>`` column (1 passed / 0 failed) per check;
* ``per_patient.csv`` -- one row per (patient, model) for patients with 2CH and 4CH at ED and ES:
  ``<index>_pred``, ``<index>_ref`` (the same method on the ground-truth masks), ``<index>_err``
  (pred - ref), ``<index>_err_pct`` for volumes, and ``<index>_meta`` / ``<index>_err_meta`` where the
  dataset's metadata carries EF/EDV/ESV;
* ``summary.json`` -- the shape scripts read (see :func:`summarise`), strict JSON (undefined -> ``null``);
* ``overlays.npz`` -- downsampled image, ground truth, each model's mask (and the reward network's
  uncertainty) of the cases the report shows; ``reliability.json`` when a reward network is given;
  ``timings.json`` (seconds per stage); ``report.html`` (:mod:`rl_adapt.report`).

Undefined metric values (an empty structure) are NaN in memory, empty cells in CSV, ``null`` in JSON; every
mean is NaN-aware and its count is reported under ``summary["counts"]``.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rl_adapt.errors import InputError
from rl_adapt.io_utils import atomic_dir, atomic_path, write_json_atomic

log = logging.getLogger(__name__)

STRUCTURES: tuple[str, ...] = ("LV", "MYO", "LA", "epi")
"""Structures scored per image (epi = LV + MYO)."""
MEAN_OVER: tuple[str, ...] = ("LV", "MYO", "LA")
"""Structures averaged into ``mean``."""
METRICS: tuple[str, ...] = ("dice", "hd", "hd95", "assd")
"""Per-structure metrics (distances in mm)."""
CLINICAL: tuple[str, ...] = ("EDV", "ESV", "EF", "GLS_2CH", "GLS_4CH")
"""Patient-level indices compared predicted vs reference (ml, ml, %, %, %)."""
VOLUMES: tuple[str, ...] = ("EDV", "ESV")
"""Indices whose error is also reported relative to the reference (percent)."""


@dataclass
class EvaluateConfig:
    """How :func:`evaluate` runs; every field has a safe default."""

    mirror: bool = False
    """Test-time mirroring (nnU-Net's flip averaging); slower, usually a small gain."""
    overlays: int = 4
    """Cases per overlay group in the report (helped most, hurt most, random)."""
    thumb_size: int = 128
    """Longest side (pixels) of the overlay thumbnails saved for the report."""
    n_bootstrap: int = 2000
    """Bootstrap resamples for the paired confidence intervals."""
    seed: int = 0
    """Seed of the bootstrap and of the random overlay cases."""
    reliability_bins: int = 10
    """Equal-width confidence bins of the reward network's reliability diagram."""
    workers: int = 0
    """Processes computing metrics (0: one per CPU core, at most 4; 1: in this process)."""
    device: str = "cpu"
    """Torch device of the models ("cpu", "cuda")."""
    report: bool = True
    """Write report.html next to the tables."""

    def __post_init__(self) -> None:
        if self.overlays < 0 or self.thumb_size < 8 or self.n_bootstrap < 1 or self.workers < 0:
            raise ValueError("overlays >= 0, thumb_size >= 8, n_bootstrap >= 1 and workers >= 0 are required")


# --------------------------------------------------------------------------------------------- numbers
def _f(x: Any) -> float:
    """``x`` as a float; None and non-numbers become NaN."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def nanmean(values: Iterable[float]) -> tuple[float, int]:
    """Mean of the finite values and how many there were; ``(nan, 0)`` when none."""
    arr = np.asarray([_f(v) for v in values], dtype=np.float64)
    ok = np.isfinite(arr)
    n = int(ok.sum())
    return (float(arr[ok].mean()) if n else float("nan")), n


def json_clean(obj: Any) -> Any:
    """Replace NaN/Inf floats by None (recursively) and numpy scalars by Python ones, for strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def bootstrap_mean_ci(values: Sequence[float], n_bootstrap: int = 2000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of the finite ``values``.

    :param values: 1-D sample (NaN ignored).
    :returns: (lo, hi); (nan, nan) when there are no finite values.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_bootstrap, dtype=np.float64)
    chunk = max(1, 2_000_000 // x.size)
    for start in range(0, n_bootstrap, chunk):
        stop = min(n_bootstrap, start + chunk)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def paired_stats(reference: Sequence[float], other: Sequence[float], n_bootstrap: int = 2000,
                 seed: int = 0) -> dict:
    """Paired comparison of two models' per-image scores (same images, same order).

    Pairs where either value is NaN are dropped. ``dice_mean_diff`` = mean(other - reference);
    ``ci95`` = percentile bootstrap of that mean; ``wilcoxon_p`` = two-sided Wilcoxon signed-rank p-value
    (1.0 when every difference is zero, NaN with no pairs).

    :returns: ``{"dice_mean_diff", "ci95": [lo, hi], "wilcoxon_p", "n"}``.
    """
    from scipy.stats import wilcoxon

    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    d = b[ok] - a[ok]
    if d.size == 0:
        return {"dice_mean_diff": float("nan"), "ci95": [float("nan"), float("nan")],
                "wilcoxon_p": float("nan"), "n": 0}
    lo, hi = bootstrap_mean_ci(d, n_bootstrap=n_bootstrap, seed=seed)
    if np.all(d == 0):
        p = 1.0
    else:
        p = float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    return {"dice_mean_diff": float(d.mean()), "ci95": [lo, hi], "wilcoxon_p": p, "n": int(d.size)}


# --------------------------------------------------------------------------------------------- summary
def image_metric_columns() -> list[str]:
    """Metric columns of ``per_image.csv``: ``<S>_<metric>`` then ``mean_<metric>``."""
    cols = [f"{s}_{m}" for s in STRUCTURES for m in METRICS]
    return cols + [f"mean_{m}" for m in METRICS]


def summarise(image_rows: Sequence[Mapping[str, Any]], patient_rows: Sequence[Mapping[str, Any]],
              model_names: Sequence[str], ece: Mapping[str, float] | None = None,
              n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """Build ``summary.json`` from the per-image and per-patient rows.

    Shape: ``{"n_images", "n_patients", "models": {NAME: {"dice"|"hd95"|"hd"|"assd": {LV, MYO, LA, epi,
    mean}, "validity_rate", "ef_mae", "edv_mae_pct", "esv_mae_pct", "ece"}}, "paired": {"NAME2 vs NAME":
    {"dice_mean_diff", "ci95": [lo, hi], "wilcoxon_p"}}, "counts": {"models": {NAME: {...}},
    "paired": {...: n}}}``. Image metrics are means over images (NaN-aware), clinical ones over patients;
    the first model is the reference of the paired comparisons (mean Dice per image, matched by case).
    Values are plain floats (NaN where undefined); pass the result through :func:`json_clean` to write it.
    """
    models: dict[str, dict] = {}
    counts: dict[str, dict] = {}
    for name in model_names:
        rows = [r for r in image_rows if r["model"] == name]
        prow = [r for r in patient_rows if r["model"] == name]
        entry: dict[str, Any] = {}
        cnt: dict[str, Any] = {"images": len(rows)}
        for metric in ("dice", "hd95", "hd", "assd"):
            entry[metric], cnt[metric] = {}, {}
            for s in STRUCTURES + ("mean",):
                entry[metric][s], cnt[metric][s] = nanmean(r.get(f"{s}_{metric}") for r in rows)
        entry["validity_rate"], cnt["validity"] = nanmean(float(bool(r["valid"])) for r in rows)
        entry["ef_mae"], cnt["ef"] = nanmean(abs(_f(r.get("EF_err"))) for r in prow)
        entry["edv_mae_pct"], cnt["edv"] = nanmean(abs(_f(r.get("EDV_err_pct"))) for r in prow)
        entry["esv_mae_pct"], cnt["esv"] = nanmean(abs(_f(r.get("ESV_err_pct"))) for r in prow)
        entry["ece"] = float("nan") if not ece or name not in ece else float(ece[name])
        cnt["patients"] = len(prow)
        models[name], counts[name] = entry, cnt
    paired: dict[str, dict] = {}
    paired_n: dict[str, int] = {}
    if model_names:
        ref = model_names[0]
        by_case = {r["case"]: _f(r.get("mean_dice")) for r in image_rows if r["model"] == ref}
        cases = list(by_case)
        for name in model_names[1:]:
            other = {r["case"]: _f(r.get("mean_dice")) for r in image_rows if r["model"] == name}
            common = [c for c in cases if c in other]
            st = paired_stats([by_case[c] for c in common], [other[c] for c in common],
                              n_bootstrap=n_bootstrap, seed=seed)
            key = f"{name} vs {ref}"
            paired_n[key] = st.pop("n")
            paired[key] = st
    patients = {r.get("patient") for r in image_rows if r.get("patient") not in (None, "")}
    return {
        "n_images": len({r["case"] for r in image_rows}),
        "n_patients": len(patients),
        "models": models,
        "paired": paired,
        "counts": {"models": counts, "paired": paired_n},
    }


def clinical_row(patient: str, model: str, pred: Mapping[str, Any], ref: Mapping[str, Any],
                 meta: Mapping[str, Any] | None = None) -> dict:
    """One ``per_patient.csv`` row: predicted vs reference indices, their errors, and vs metadata.

    :param pred: indices from the predicted masks (EDV/ESV in ml, EF/GLS in %).
    :param ref: the same indices computed by the same method on the ground-truth masks.
    :param meta: reference values recorded with the dataset (EF, EDV, ESV), when known.
    """
    row: dict[str, Any] = {"patient": patient, "model": model}
    for key in CLINICAL:
        p, r = _f(pred.get(key)), _f(ref.get(key))
        row[f"{key}_pred"], row[f"{key}_ref"], row[f"{key}_err"] = p, r, p - r
        if key in VOLUMES:
            row[f"{key}_err_pct"] = 100.0 * (p - r) / r if (math.isfinite(r) and r != 0) else float("nan")
    for key in ("EF", "EDV", "ESV"):
        m = _f((meta or {}).get(key))
        row[f"{key}_meta"] = m
        row[f"{key}_err_meta"] = _f(pred.get(key)) - m
    return row


# --------------------------------------------------------------------------------------------- CSV
def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(float(v)) else f"{float(v):.6g}"
    return v


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Write ``rows`` as CSV atomically; NaN/None become empty cells, booleans 0/1.

    :param columns: column order; default: keys in order of first appearance.
    """
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: _cell(r.get(k)) for k in columns})


TEXT_COLUMNS: tuple[str, ...] = ("case", "patient", "view", "phase", "model", "failed_checks", "group")
"""Columns that stay strings when a table is read back (ids such as ``0001`` must not become numbers)."""


def read_csv(path: str | Path, text_columns: Sequence[str] = TEXT_COLUMNS) -> list[dict]:
    """Read a CSV written by :func:`write_csv`; numeric cells become floats, empty cells NaN.

    :param text_columns: columns kept as strings ("" stays "").
    """
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            row = {}
            for k, v in r.items():
                if k in text_columns:
                    row[k] = v
                    continue
                if v == "":
                    row[k] = float("nan")
                    continue
                try:
                    row[k] = float(v)
                except ValueError:
                    row[k] = v
            out.append(row)
    return out
