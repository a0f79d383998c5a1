"""Which target patients does a model segment worst? A label-free ranking by anatomical implausibility.

Ranks the target patients by how implausible the model's own masks are: the number of anatomical checks
(:func:`rl_adapt.measures.anatomy.check_anatomy`) their images fail; a quality review of a model's outputs before (or
after) adaptation, without labels. Measured on real CAMUS through the synthetic shifts (CPU source model, 160
images): Spearman correlation of an image's failed-check count with its true Dice -0.51 (low gain), -0.53 (shadow),
-0.17 (blur); the quarter of images it ranks worst has true Dice 0.494 vs 0.607 overall (low gain).

Choosing the *expert-masked* patients for ``rl-adapt adapt --expert`` this way did not beat a random choice
(results/camus_shift.md: 10 of a 25-patient pool, same 25 test patients; low gain +0.059 vs +0.069 to +0.077 for
three random draws, shadow +0.081 vs +0.061 to +0.082): for adaptation, correct a random sample of patients.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rl_adapt.measures.anatomy import check_anatomy


def image_rows(names: Sequence[str], patients: Sequence[str | None], masks: Sequence[np.ndarray]) -> list[dict]:
    """One row per image: ``case``, ``patient``, ``valid`` (0/1), ``n_failed``, ``failed_checks`` (";"-joined).

    :param names: case names.
    :param patients: patient id per case (None: the case is its own patient).
    :param masks: (H, W) integer label maps (0 bg, 1 LV, 2 MYO, 3 LA), the model's raw outputs.
    """
    if not (len(names) == len(patients) == len(masks)):
        raise ValueError(f"names, patients and masks differ in length: {len(names)}, {len(patients)}, {len(masks)}")
    rows = []
    for name, patient, mask in zip(names, patients, masks):
        report = check_anatomy(np.asarray(mask))
        rows.append({"case": name, "patient": patient or name, "valid": int(report.valid),
                     "n_failed": len(report.failed), "failed_checks": ";".join(report.failed)})
    return rows


def patient_ranking(rows: Sequence[dict]) -> list[dict]:
    """Patients worst first: most failed checks over their images, then most invalid images, then by name.

    :param rows: from :func:`image_rows`.
    :returns: rows ``rank`` (1 = most implausible), ``patient``, ``images``, ``invalid_images``, ``failed_checks``
        (total count), ``cases`` (";"-joined).
    """
    by_patient: dict[str, list[dict]] = {}
    for r in rows:
        by_patient.setdefault(r["patient"], []).append(r)
    out = [{"patient": p, "images": len(rs), "invalid_images": sum(1 - r["valid"] for r in rs),
            "failed_checks": sum(r["n_failed"] for r in rs), "cases": ";".join(r["case"] for r in rs)}
           for p, rs in by_patient.items()]
    out.sort(key=lambda r: (-r["failed_checks"], -r["invalid_images"], r["patient"]))
    return [{"rank": i + 1, **r} for i, r in enumerate(out)]
