"""Aggregation of per-image metrics and per-patient clinical indices into tables and summaries.

Dependency-light (numpy, scipy.stats, csv). Conventions:

* NaN means *undefined* (e.g. HD with an empty mask): summaries drop NaNs and report how many (``n_nan``);
* bootstrap confidence intervals are percentile intervals of the mean over ``n_bootstrap`` resamples
  drawn from ``numpy.random.default_rng(seed)`` — the same inputs always give the same interval;
* clinical errors per patient: ``EF_abs_err`` = |EF_pred − EF_ref| (points), ``EDV_rel_err`` =
  100·|EDV_pred − EDV_ref| / EDV_ref (%), ``ESV_rel_err`` likewise (%), plus signed ``EF_err`` etc.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rl_adapt.io_utils import write_csv

TIDY_COLUMNS: tuple[str, ...] = ("model", "case", "patient", "view", "phase", "structure", "metric", "value")
"""Columns of :meth:`MetricAccumulator.rows` (one row per value)."""


def _as_float_array(values: Iterable[Any]) -> np.ndarray:
    out = []
    for v in values:
        try:
            out.append(float(v) if v is not None else math.nan)
        except (TypeError, ValueError):
            out.append(math.nan)
    return np.asarray(out, dtype=float)


def bootstrap_ci(values: Sequence[float], n_bootstrap: int = 2000, seed: int = 0,
                 level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval ``[lo, hi]`` of the mean of the finite values (NaN if none)."""
    x = _as_float_array(values)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return [math.nan, math.nan]
    if x.size == 1:
        return [float(x[0]), float(x[0])]
    rng = np.random.default_rng(seed)
    means = np.empty(n_bootstrap)
    chunk = max(1, 4_000_000 // x.size)
    for s in range(0, n_bootstrap, chunk):
        k = min(chunk, n_bootstrap - s)
        means[s : s + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return [float(lo), float(hi)]


def summarize(values: Iterable[Any], n_bootstrap: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean, std (ddof=1), median and 95 % bootstrap CI of the finite values; NaNs are counted, not used.

    :param values: numbers (None / NaN / non-numeric count as NaN).
    :return: ``{"mean", "std", "median", "ci95": [lo, hi], "n", "n_nan"}`` (``n`` = finite values used).
    """
    x = _as_float_array(values)
    finite = x[np.isfinite(x)]
    n = int(finite.size)
    return {
        "mean": float(finite.mean()) if n else math.nan,
        "std": float(finite.std(ddof=1)) if n > 1 else (0.0 if n == 1 else math.nan),
        "median": float(np.median(finite)) if n else math.nan,
        "ci95": bootstrap_ci(finite, n_bootstrap, seed),
        "n": n,
        "n_nan": int(x.size - n),
    }


def paired_difference(a: Iterable[Any], b: Iterable[Any], n_bootstrap: int = 2000,
                      seed: int = 0) -> dict[str, Any]:
    """Paired comparison of two methods on the same items: ``d = a − b``.

    Pairs where either value is NaN are dropped (counted in ``n_dropped``).

    :return: ``{"mean_diff", "ci95": [lo, hi] (bootstrap of the mean difference), "wilcoxon_p"
        (two-sided signed-rank, scipy.stats.wilcoxon; 1.0 when all differences are 0, NaN with no pair),
        "n", "n_dropped"}``.
    """
    from scipy.stats import wilcoxon

    x, y = _as_float_array(a), _as_float_array(b)
    if x.shape != y.shape:
        raise ValueError(f"paired_difference needs equal lengths, got {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    if d.size == 0:
        p = math.nan
    elif np.all(d == 0):
        p = 1.0
    else:
        p = float(wilcoxon(d).pvalue)
    return {
        "mean_diff": float(d.mean()) if d.size else math.nan,
        "ci95": bootstrap_ci(d, n_bootstrap, seed),
        "wilcoxon_p": p,
        "n": int(d.size),
        "n_dropped": int(x.size - d.size),
    }


def clinical_errors(pred: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, float]:
    """Per-patient clinical errors of predicted indices against reference ones (see the module docstring).

    :param pred: indices of the prediction (keys ``EF``, ``EDV``, ``ESV``; e.g. from
        :func:`rl_adapt.measures.clinical.patient_indices`); :param ref: the reference indices.
    :return: ``EF_err``, ``EF_abs_err`` (points), ``EDV_err``/``ESV_err`` (ml, signed),
        ``EDV_rel_err``/``ESV_rel_err`` (%, absolute); NaN where either side is missing.
    """
    def get(d: Mapping[str, Any], k: str) -> float:
        v = d.get(k)
        try:
            return float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            return math.nan

    out: dict[str, float] = {}
    ef = get(pred, "EF") - get(ref, "EF")
    out["EF_err"], out["EF_abs_err"] = ef, abs(ef)
    for k in ("EDV", "ESV"):
        r = get(ref, k)
        e = get(pred, k) - r
        out[f"{k}_err"] = e
        out[f"{k}_rel_err"] = 100.0 * abs(e) / r if r > 0 else math.nan
    return out


@dataclass
class _Image:
    model: str
    case: str
    patient: str | None
    view: str | None
    phase: str | None
    metrics: dict[str, dict[str, float]]
    anatomy: dict[str, Any] | None


@dataclass
class MetricAccumulator:
    """Collects per-image metrics (and anatomy reports) and per-patient clinical indices of models.

    Typical use::

        acc = MetricAccumulator()
        acc.add(case, segmentation_metrics(pred, gt, spacing), check_anatomy(pred), model="adapted")
        acc.add_patient("patient0001", "adapted", patient_indices(pred_cases), patient_indices(gt_cases))
        acc.write_csv("metrics_long.csv"); acc.summary()
    """

    images: list[_Image] = field(default_factory=list)
    patients: list[dict[str, Any]] = field(default_factory=list)

    def add(self, case: Any, metrics: Mapping[str, Mapping[str, float]], anatomy: Any = None,
            model: str = "model", patient: str | None = None, view: str | None = None,
            phase: str | None = None) -> None:
        """Add one image.

        :param case: a :class:`rl_adapt.data.case.Case` (name and meta used) or a case name.
        :param metrics: ``{structure: {metric: value}}`` as returned by ``segmentation_metrics``.
        :param anatomy: an :class:`rl_adapt.measures.anatomy.AnatomyReport`, its ``to_dict()``, or None.
        :param model: model name; ``patient``/``view``/``phase`` override the case's meta.
        """
        name = getattr(case, "name", case)
        meta = getattr(case, "meta", {}) or {}
        if anatomy is not None and hasattr(anatomy, "to_dict"):
            anatomy = anatomy.to_dict()
        self.images.append(_Image(
            model=str(model), case=str(name),
            patient=patient if patient is not None else meta.get("patient"),
            view=view if view is not None else meta.get("view"),
            phase=phase if phase is not None else meta.get("phase"),
            metrics={s: {k: float(v) for k, v in m.items()} for s, m in metrics.items()},
            anatomy=anatomy,
        ))

    def add_patient(self, patient: str, model: str, pred: Mapping[str, Any],
                    ref: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Add one patient's clinical indices (and errors against ``ref`` when given); returns the row."""
        row: dict[str, Any] = {"model": str(model), "patient": str(patient)}
        for k, v in pred.items():
            if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
                row[k] = float(v)
        if ref is not None:
            for k in ("EF", "EDV", "ESV"):
                row[f"ref_{k}"] = float(ref.get(k, math.nan))
            row.update(clinical_errors(pred, ref))
        self.patients.append(row)
        return row

    def rows(self) -> list[dict[str, Any]]:
        """Tidy table: one dict per value with :data:`TIDY_COLUMNS`. Anatomy appears as structure
        ``"anatomy"`` with metric ``"valid"`` (1/0) and one metric per check (its value)."""
        out = []
        for im in self.images:
            base = {"model": im.model, "case": im.case, "patient": im.patient, "view": im.view, "phase": im.phase}
            for s, m in im.metrics.items():
                for k, v in m.items():
                    out.append({**base, "structure": s, "metric": k, "value": v})
            if im.anatomy is not None:
                out.append({**base, "structure": "anatomy", "metric": "valid", "value": float(im.anatomy["valid"])})
                for name, c in im.anatomy.get("checks", {}).items():
                    v = c.get("value")
                    out.append({**base, "structure": "anatomy", "metric": name,
                                "value": math.nan if v is None else float(v)})
        return out

    def wide(self) -> list[dict[str, Any]]:
        """Per-image table: model, case, patient, view, phase, ``<structure>_<metric>``, ``valid``, ``failed``."""
        out = []
        for im in self.images:
            row: dict[str, Any] = {"model": im.model, "case": im.case, "patient": im.patient,
                                   "view": im.view, "phase": im.phase}
            for s, m in im.metrics.items():
                for k, v in m.items():
                    row[f"{s}_{k}"] = v
            if im.anatomy is not None:
                row["valid"] = bool(im.anatomy["valid"])
                row["failed"] = ";".join(im.anatomy.get("failed", []))
            out.append(row)
        return out

    def models(self) -> list[str]:
        """Model names in order of first appearance."""
        seen: dict[str, None] = {}
        for im in self.images:
            seen.setdefault(im.model)
        for p in self.patients:
            seen.setdefault(p["model"])
        return list(seen)

    def values(self, model: str, structure: str, metric: str) -> list[float]:
        """Per-image values of one metric of one model, in insertion order (NaN kept)."""
        return [im.metrics.get(structure, {}).get(metric, math.nan) for im in self.images if im.model == model]

    def summary(self, n_bootstrap: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
        """``{model: {"<structure>_<metric>": summarize(...), "valid_fraction": summarize(0/1),
        "<clinical error>": summarize(...), "n_images", "n_patients"}}``."""
        out: dict[str, dict[str, Any]] = {}
        for model in self.models():
            ims = [im for im in self.images if im.model == model]
            res: dict[str, Any] = {"n_images": len(ims)}
            keys = []
            for im in ims:
                for s, m in im.metrics.items():
                    for k in m:
                        if (s, k) not in keys:
                            keys.append((s, k))
            for s, k in keys:
                res[f"{s}_{k}"] = summarize(self.values(model, s, k), n_bootstrap, seed)
            valid = [float(im.anatomy["valid"]) for im in ims if im.anatomy is not None]
            if valid:
                res["valid_fraction"] = summarize(valid, n_bootstrap, seed)
            pats = [p for p in self.patients if p["model"] == model]
            res["n_patients"] = len(pats)
            for k in ("EF_abs_err", "EDV_rel_err", "ESV_rel_err", "EF_err", "EDV_err", "ESV_err"):
                if any(k in p for p in pats):
                    res[k] = summarize([p.get(k, math.nan) for p in pats], n_bootstrap, seed)
            out[model] = res
        return out

    def write_csv(self, tidy_path: str | Path, wide_path: str | Path | None = None,
                  patients_path: str | Path | None = None) -> None:
        """Write the tidy table (and optionally the wide and per-patient tables) as CSV, atomically."""
        write_csv(tidy_path, self.rows(), TIDY_COLUMNS)
        if wide_path is not None:
            write_csv(wide_path, self.wide())
        if patients_path is not None:
            write_csv(patients_path, self.patients)
