"""What is scored per image, per patient and per model: the columns of the evaluation tables and ``summary.json``.

Per image (:func:`score_image`): Dice, HD, HD95 and ASSD (mm) of LV, MYO, LA and the epicardium, their means over
LV/MYO/LA, and the anatomical checks. Per patient with 2CH and 4CH at ED and ES (:func:`clinical_row`): EDV, ESV,
EF (Simpson's biplane) and GLS of the prediction against the same indices of the reference masks. Per model
(:func:`summarise`): NaN-aware means, validity rate, clinical errors, and paired comparisons with the first model.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from rl_adapt.data.case import Case
from rl_adapt.errors import RLAdaptError
from rl_adapt.measures.anatomy import check_anatomy
from rl_adapt.measures.clinical import patient_indices
from rl_adapt.measures.metrics import segmentation_metrics
from rl_adapt.measures.statistics import as_float, nanmean, paired_difference

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


TEXT_COLUMNS: tuple[str, ...] = ("case", "patient", "view", "phase", "model", "failed_checks", "group")
"""Columns that stay strings when a table is read back (ids such as ``0001`` must not become numbers)."""


def paired_stats(reference: Sequence[float], other: Sequence[float], n_bootstrap: int = 2000,
                 seed: int = 0) -> dict:
    """Paired comparison of two models' per-image scores (same images, same order).

    Uses :func:`rl_adapt.measures.aggregate.paired_difference` on ``other - reference``: pairs with a NaN are
    dropped; ``ci95`` is the percentile bootstrap of the mean difference; ``wilcoxon_p`` the two-sided
    Wilcoxon signed-rank p-value (1.0 when every difference is zero, NaN with no pairs).

    :returns: ``{"dice_mean_diff", "ci95": [lo, hi], "wilcoxon_p", "n"}``.
    """

    d = paired_difference(other, reference, n_bootstrap=n_bootstrap, seed=seed)
    return {"dice_mean_diff": float(d["mean_diff"]), "ci95": [float(v) for v in d["ci95"]],
            "wilcoxon_p": float(d["wilcoxon_p"]), "n": int(d["n"])}


def image_metric_columns() -> list[str]:
    """Metric columns of ``per_image.csv``: ``<S>_<metric>`` then ``mean_<metric>``."""
    cols = [f"{s}_{m}" for s in STRUCTURES for m in METRICS]
    return cols + [f"mean_{m}" for m in METRICS]


def summarise(image_rows: Sequence[Mapping[str, Any]], patient_rows: Sequence[Mapping[str, Any]],
              model_names: Sequence[str], ece: Mapping[str, float] | None = None,
              n_bootstrap: int = 2000, seed: int = 0, pairs: Sequence[tuple[str, str]] = ()) -> dict:
    """Build ``summary.json`` from the per-image and per-patient rows.

    Shape: ``{"n_images", "n_patients", "models": {NAME: {"dice"|"hd95"|"hd"|"assd": {LV, MYO, LA, epi,
    mean}, "validity_rate", "ef_mae", "edv_mae_pct", "esv_mae_pct", "ece"}}, "paired": {"NAME2 vs NAME":
    {"dice_mean_diff", "ci95": [lo, hi], "wilcoxon_p"}}, "counts": {"models": {NAME: {...}},
    "paired": {...: n}}}``. Image metrics are means over images (NaN-aware), clinical ones over patients;
    the first model is the reference of the paired comparisons (mean Dice per image, matched by case), and
    ``pairs`` adds ``(name, reference)`` comparisons between other models (e.g. the adapted model against a
    baseline), keyed ``"name vs reference"`` after the first model's.
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
        entry["ef_mae"], cnt["ef"] = nanmean(abs(as_float(r.get("EF_err"))) for r in prow)
        entry["edv_mae_pct"], cnt["edv"] = nanmean(abs(as_float(r.get("EDV_err_pct"))) for r in prow)
        entry["esv_mae_pct"], cnt["esv"] = nanmean(abs(as_float(r.get("ESV_err_pct"))) for r in prow)
        entry["ece"] = float("nan") if not ece or name not in ece else float(ece[name])
        cnt["patients"] = len(prow)
        models[name], counts[name] = entry, cnt
    paired: dict[str, dict] = {}
    paired_n: dict[str, int] = {}
    comparisons = [(name, model_names[0]) for name in model_names[1:]]
    comparisons += [pair for pair in pairs if pair not in comparisons and pair[0] != pair[1]]
    for name, ref in comparisons:
        by_case = {r["case"]: as_float(r.get("mean_dice")) for r in image_rows if r["model"] == ref}
        other = {r["case"]: as_float(r.get("mean_dice")) for r in image_rows if r["model"] == name}
        common = [c for c in by_case if c in other]
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
        p, r = as_float(pred.get(key)), as_float(ref.get(key))
        row[f"{key}_pred"], row[f"{key}_ref"], row[f"{key}_err"] = p, r, p - r
        if key in VOLUMES:
            row[f"{key}_err_pct"] = 100.0 * (p - r) / r if (math.isfinite(r) and r != 0) else float("nan")
    for key in ("EF", "EDV", "ESV"):
        m = as_float((meta or {}).get(key))
        row[f"{key}_meta"] = m
        row[f"{key}_err_meta"] = as_float(pred.get(key)) - m
    return row


def score_image(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict:
    """Metrics and anatomical checks of one predicted label map.

    :param pred: (H, W) uint8 prediction; :param gt: (H, W) uint8 reference; :param spacing: (row, col) mm.
    :returns: flat dict: ``<S>_<metric>``, ``mean_<metric>``, ``valid``, ``failed_checks``, ``check_<name>``.
    """

    m = segmentation_metrics(pred, gt, spacing)
    row: dict[str, Any] = {}
    for s in STRUCTURES:
        for k in METRICS:
            row[f"{s}_{k}"] = as_float(m[s][k])
    for k in METRICS:
        row[f"mean_{k}"] = nanmean(row[f"{s}_{k}"] for s in MEAN_OVER)[0]
    rep = check_anatomy(pred)
    row["valid"] = bool(rep.valid)
    row["failed_checks"] = ";".join(rep.failed)
    for c in rep.checks:
        row[f"check_{c.name}"] = bool(c.passed)
    return row


def _clinical_cases(cases: Sequence, masks: Sequence[np.ndarray]) -> list:
    return [Case(name=c.name, image=c.image, label=m, spacing=c.spacing, meta=dict(c.meta)) for c, m in zip(cases, masks)]


def complete_patients(cases: Sequence) -> dict[str, list[int]]:
    """Patients with 2CH and 4CH at ED and ES: ``{patient: [case indices]}`` (one case per view/phase)."""
    groups: dict[str, dict[tuple, int]] = {}
    for i, c in enumerate(cases):
        p, v, ph = c.meta.get("patient"), c.meta.get("view"), c.meta.get("phase")
        if p and v in ("2CH", "4CH") and ph in ("ED", "ES"):
            groups.setdefault(str(p), {}).setdefault((v, ph), i)
    return {p: list(g.values()) for p, g in sorted(groups.items()) if len(g) == 4}


def clinical_exclusions(cases: Sequence, patients: Mapping[str, Sequence[int]], listed: int = 20) -> dict:
    """The images left out of the clinical indices (EF, volumes, strain) and why, for a warning a user sees.

    :param patients: :func:`complete_patients` of ``cases``.
    :returns: ``{"count", "not_camus_named", "incomplete_patients" (patients), "in_incomplete_patients" (images),
        "duplicates", "cases" (up to ``listed`` names), "message" (None when nothing is left out)}``.
    """
    used = {i for idx in patients.values() for i in idx}
    unnamed, partial, duplicate = [], {}, []
    for i, c in enumerate(cases):
        if i in used:
            continue
        p, v, ph = c.meta.get("patient"), c.meta.get("view"), c.meta.get("phase")
        if not (p and v in ("2CH", "4CH") and ph in ("ED", "ES")):
            unnamed.append(c.name)
        elif str(p) in patients:
            duplicate.append(c.name)
        else:
            partial.setdefault(str(p), []).append(c.name)
    left = [*unnamed, *(n for names in partial.values() for n in names), *duplicate]
    reasons = []
    if unnamed:
        reasons.append(f"{len(unnamed)} have no patient/view/phase (names not CAMUS-like "
                       "patientXXXX_{2CH,4CH}_{ED,ES})")
    if partial:
        reasons.append(f"{sum(map(len, partial.values()))} belong to {len(partial)} patient(s) without all four "
                       "2CH/4CH x ED/ES images")
    if duplicate:
        reasons.append(f"{len(duplicate)} repeat a view and phase their patient already has")
    message = None
    if left:
        message = (f"{len(left)} of {len(cases)} images are left out of the clinical indices (EF, volumes, strain; "
                   f"{len(patients)} complete patient(s) remain): " + "; ".join(reasons))
    return {"count": len(left), "not_camus_named": len(unnamed), "incomplete_patients": len(partial),
            "in_incomplete_patients": sum(map(len, partial.values())), "duplicates": len(duplicate),
            "cases": left[:listed], "message": message}


def patient_indices_or_empty(cases: Sequence, masks: Sequence[np.ndarray]) -> dict:
    """:func:`rl_adapt.measures.clinical.patient_indices` of one patient's four cases with ``masks`` as their labels.

    Returns ``{}`` when the indices cannot be computed (e.g. an empty LV): they become NaN, counted.
    """

    try:
        return dict(patient_indices(_clinical_cases(cases, masks)))
    except (RLAdaptError, ValueError, ZeroDivisionError) as exc:
        log.debug("clinical indices of %s failed: %s", cases[0].meta.get("patient"), exc)
        return {}


def patient_columns() -> list[str]:
    cols = ["patient", "model"]
    for key in CLINICAL:
        cols += [f"{key}_pred", f"{key}_ref", f"{key}_err"] + ([f"{key}_err_pct"] if key in VOLUMES else [])
    for key in ("EF", "EDV", "ESV"):
        cols += [f"{key}_meta", f"{key}_err_meta"]
    return cols
