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
  ``timings.json`` (seconds per stage); ``report.html`` (:mod:`rl_adapt.evaluation.report`);
* ``postprocessed/per_image.csv`` and ``postprocessed/per_patient.csv`` when a postprocessing rule applies (see
  :attr:`EvaluateConfig.postprocessing`): the same tables for every model's outputs after that one rule, summarised
  under ``summary["postprocessed"]`` (same shape as the raw summary, paired against the first model postprocessed
  the same way) with the rule under ``summary["postprocessing"]``. The raw tables and summary are unchanged.

Undefined metric values (an empty structure) are NaN in memory, empty cells in CSV, ``null`` in JSON; every
mean is NaN-aware and its count is reported under ``summary["counts"]``.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rl_adapt.errors import InputError
from rl_adapt.io_utils import atomic_dir, write_csv, write_json_atomic

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
    workers: int = -1
    """Processes computing metrics and clinical indices while prediction runs (-1: one per CPU core, at
    most 4, so every core stays busy during and after prediction; 0: everything in this process)."""
    torch_threads: int = 1
    """Torch CPU threads for prediction (0: leave torch's setting). One thread per image is the fastest on
    small CPUs: batch-1 forwards of small networks scale poorly across threads, and the other cores run
    the metric workers at the same time."""
    device: str = "cpu"
    """Torch device of the models ("cpu", "cuda")."""
    report: bool = True
    """Write report.html next to the tables."""
    postprocessing: str = "auto"
    """Postprocessing rule applied, in addition to the raw outputs, to EVERY model compared (see
    :mod:`rl_adapt.postprocessing`): "auto" = the rule stored in the model folders (``postprocessing.json``; all
    folders that carry one must carry the same rule; none: raw only), "none" = raw only, or the path of a
    ``postprocessing.json`` (or of a model folder holding one)."""

    def __post_init__(self) -> None:
        if self.overlays < 0 or self.thumb_size < 8 or self.n_bootstrap < 1 or self.workers < -1 \
                or self.torch_threads < 0:
            raise ValueError("overlays >= 0, thumb_size >= 8, n_bootstrap >= 1, workers >= -1 and "
                             "torch_threads >= 0 are required")


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


def bootstrap_mean_ci(values: Sequence[float], n_bootstrap: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % CI of the mean of the finite ``values`` (:func:`rl_adapt.measures.aggregate.bootstrap_ci`).

    :returns: (lo, hi); (nan, nan) when there are no finite values.
    """
    from rl_adapt.measures.aggregate import bootstrap_ci

    lo, hi = bootstrap_ci(values, n_bootstrap=n_bootstrap, seed=seed)
    return float(lo), float(hi)


def paired_stats(reference: Sequence[float], other: Sequence[float], n_bootstrap: int = 2000,
                 seed: int = 0) -> dict:
    """Paired comparison of two models' per-image scores (same images, same order).

    Uses :func:`rl_adapt.measures.aggregate.paired_difference` on ``other - reference``: pairs with a NaN are
    dropped; ``ci95`` is the percentile bootstrap of the mean difference; ``wilcoxon_p`` the two-sided
    Wilcoxon signed-rank p-value (1.0 when every difference is zero, NaN with no pairs).

    :returns: ``{"dice_mean_diff", "ci95": [lo, hi], "wilcoxon_p", "n"}``.
    """
    from rl_adapt.measures.aggregate import paired_difference

    d = paired_difference(other, reference, n_bootstrap=n_bootstrap, seed=seed)
    return {"dice_mean_diff": float(d["mean_diff"]), "ci95": [float(v) for v in d["ci95"]],
            "wilcoxon_p": float(d["wilcoxon_p"]), "n": int(d["n"])}


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


# --------------------------------------------------------------------------------------------- inputs
def parse_model_specs(specs: Sequence[str]) -> dict[str, Path]:
    """``["NAME=DIR", ...]`` (or bare ``DIR``, named after the folder) -> ordered ``{name: Path}``.

    :raises InputError: empty list, empty name, duplicate names.
    """
    out: dict[str, Path] = {}
    if not specs:
        raise InputError(None, "give at least one --model NAME=MODEL_DIR")
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        name = name.strip()
        if not name or not path:
            raise InputError(None, f"--model {spec!r}: expected NAME=MODEL_DIR")
        if name in out:
            raise InputError(Path(path), f"model name {name!r} given twice")
        out[name] = Path(path)
    return out


def load_model(model_dir: str | Path, device: str = "cpu"):
    """Load an nnU-Net v2 results folder; any failure becomes one :class:`InputError` naming the folder.

    The label set must be CAMUS's (background, LV, MYO, LA) so that metrics compare like with like.
    """
    from rl_adapt.errors import RLAdaptError
    from rl_adapt.policies.nnunet import CAMUS_LABELS, load_model_folder

    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(path, "model folder not found")
    try:
        return load_model_folder(path, device=device, expected_labels=CAMUS_LABELS)
    except RLAdaptError:
        raise
    except Exception as exc:  # nnunetv2/torch raise many types on a broken folder
        raise InputError(path, f"not a loadable nnU-Net v2 results folder ({type(exc).__name__}: {exc})") from exc


def load_labelled(data: str | Path, progress: bool = False) -> list:
    """Read a labelled dataset (any reader format) and keep its labelled cases.

    :raises InputError: missing/empty folder, no labelled case, a label map whose shape differs from its
        image, labels outside 0..3, duplicate case names.
    """
    from rl_adapt.data.readers import read_dataset

    path = Path(data)
    if not path.exists():
        raise InputError(path, "labelled dataset not found")
    if path.is_dir() and not any(path.iterdir()):
        raise InputError(path, "folder is empty")
    cases = read_dataset(path, with_labels=True, progress=progress)
    if not cases:
        raise InputError(path, "no cases found")
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise InputError(path, f"none of the {len(cases)} cases has a label map; evaluate needs a labelled set")
    if len(labelled) < len(cases):
        log.warning("%s: %d of %d cases have no label map and are skipped", path, len(cases) - len(labelled), len(cases))
    names = [c.name for c in labelled]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(path, f"duplicate case names: {', '.join(dup[:5])}")
    for c in labelled:
        if tuple(c.label.shape) != tuple(c.image.shape[:2]):
            raise InputError(c.source or path, f"{c.name}: label shape {c.label.shape} differs from image {c.image.shape}")
        if c.label.size and int(c.label.max()) > 3:
            raise InputError(c.source or path, f"{c.name}: labels outside 0..3 (bg, LV, MYO, LA)")
    return labelled


def find_reward_net(run: str | Path) -> Path:
    """The reward-network file of an adaptation run folder (``RUN/reward_net.pt``, else the last
    ``RUN/iter*/reward_net.pt``), or ``run`` itself when it is a file."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise InputError(run, "reward run folder not found")
    if (run / "reward_net.pt").is_file():
        return run / "reward_net.pt"
    iters = sorted(run.glob("iter*/reward_net.pt"), key=lambda p: int("".join(ch for ch in p.parent.name if ch.isdigit()) or 0))
    if iters:
        return iters[-1]
    raise InputError(run, "no reward_net.pt in this run folder (expected RUN/reward_net.pt or RUN/iter*/reward_net.pt)")


# --------------------------------------------------------------------------------------------- scoring
def score_image(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict:
    """Metrics and anatomical checks of one predicted label map.

    :param pred: (H, W) uint8 prediction; :param gt: (H, W) uint8 reference; :param spacing: (row, col) mm.
    :returns: flat dict: ``<S>_<metric>``, ``mean_<metric>``, ``valid``, ``failed_checks``, ``check_<name>``.
    """
    from rl_adapt.measures.anatomy import check_anatomy
    from rl_adapt.measures.metrics import segmentation_metrics

    m = segmentation_metrics(pred, gt, spacing)
    row: dict[str, Any] = {}
    for s in STRUCTURES:
        for k in METRICS:
            row[f"{s}_{k}"] = _f(m[s][k])
    for k in METRICS:
        row[f"mean_{k}"] = nanmean(row[f"{s}_{k}"] for s in MEAN_OVER)[0]
    rep = check_anatomy(pred)
    row["valid"] = bool(rep.valid)
    row["failed_checks"] = ";".join(rep.failed)
    for c in rep.checks:
        row[f"check_{c.name}"] = bool(c.passed)
    return row


def _clinical_cases(cases: Sequence, masks: Sequence[np.ndarray]) -> list:
    from rl_adapt.data.case import Case

    return [Case(name=c.name, image=c.image, label=m, spacing=c.spacing, meta=dict(c.meta)) for c, m in zip(cases, masks)]


def complete_patients(cases: Sequence) -> dict[str, list[int]]:
    """Patients with 2CH and 4CH at ED and ES: ``{patient: [case indices]}`` (one case per view/phase)."""
    groups: dict[str, dict[tuple, int]] = {}
    for i, c in enumerate(cases):
        p, v, ph = c.meta.get("patient"), c.meta.get("view"), c.meta.get("phase")
        if p and v in ("2CH", "4CH") and ph in ("ED", "ES"):
            groups.setdefault(str(p), {}).setdefault((v, ph), i)
    return {p: list(g.values()) for p, g in sorted(groups.items()) if len(g) == 4}


def patient_indices_or_empty(cases: Sequence, masks: Sequence[np.ndarray]) -> dict:
    """:func:`rl_adapt.measures.clinical.patient_indices` of one patient's four cases with ``masks`` as their labels.

    Returns ``{}`` when the indices cannot be computed (e.g. an empty LV): they become NaN, counted.
    """
    from rl_adapt.measures.clinical import patient_indices
    from rl_adapt.errors import RLAdaptError

    try:
        return dict(patient_indices(_clinical_cases(cases, masks)))
    except (RLAdaptError, ValueError, ZeroDivisionError) as exc:
        log.debug("clinical indices of %s failed: %s", cases[0].meta.get("patient"), exc)
        return {}


def clinical_rows(cases: Sequence, preds: Mapping[str, Sequence[np.ndarray]]) -> list[dict]:
    """``per_patient.csv`` rows: each complete patient x model (see :func:`clinical_row`), in this process."""
    rows = []
    for patient, idx in complete_patients(cases).items():
        sel = [cases[i] for i in idx]
        ref = patient_indices_or_empty(sel, [c.label for c in sel])
        meta = {k: sel[0].meta.get(k) for k in ("EF", "EDV", "ESV")}
        for name, masks in preds.items():
            rows.append(clinical_row(patient, name, patient_indices_or_empty(sel, [masks[i] for i in idx]), ref, meta))
    return rows


class _Runner:
    """CPU jobs (metrics, clinical indices) in forked worker processes as soon as they are submitted, so
    they overlap with prediction; inline when ``workers`` is 0 or fork is unavailable."""

    def __init__(self, workers: int, torch_threads: int = 1):
        import multiprocessing as mp

        n = workers if workers >= 0 else max(1, min(4, os.cpu_count() or 1))
        self.pool = None
        if n >= 1 and "fork" in mp.get_all_start_methods():
            self.pool = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("fork"))

    def submit(self, fn, *args) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # delivered when .result() is called, as from a pool
            fut.set_exception(exc)
        return fut

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------- overlays
def thumb_index(shape: Sequence[int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour row/col indices that shrink ``shape`` to at most ``size`` pixels on its long side."""
    h, w = int(shape[0]), int(shape[1])
    f = min(1.0, size / max(h, w))
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    return (np.minimum((np.arange(nh) + 0.5) * h / nh, h - 1).astype(np.intp),
            np.minimum((np.arange(nw) + 0.5) * w / nw, w - 1).astype(np.intp))


def image_to_uint8(image: np.ndarray) -> np.ndarray:
    """Display version of an image: (H, W) uint8 stretched between its 1st and 99th percentiles."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, (1, 99)) if img.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def select_overlays(image_rows: Sequence[Mapping], cases: Sequence[str], models: Sequence[str], n: int,
                    seed: int = 0) -> list[tuple[str, str]]:
    """Cases shown in the report: ``[(case, group)]``.

    With two or more models: the ``n`` cases with the largest and the ``n`` with the smallest paired
    difference of mean Dice (last model minus first) as "helped"/"hurt", then ``n`` random others;
    with one model: the ``n`` lowest mean Dice ("worst") and ``n`` random others.
    """
    if n <= 0 or not cases:
        return []
    dice = {(r["model"], r["case"]): _f(r.get("mean_dice")) for r in image_rows}
    first, last = models[0], models[-1]
    chosen: list[tuple[str, str]] = []
    if len(models) > 1:
        diffs = [(dice.get((last, c), np.nan) - dice.get((first, c), np.nan), c) for c in cases]
        diffs = [(d, c) for d, c in diffs if math.isfinite(d)]
        diffs.sort(key=lambda t: (-t[0], t[1]))
        chosen += [(c, "helped") for d, c in diffs[:n] if d > 0]
        taken = {c for c, _ in chosen}
        chosen += [(c, "hurt") for d, c in reversed(diffs) if d < 0 and c not in taken][:n]
    else:
        order = sorted(((dice.get((first, c), np.nan), c) for c in cases), key=lambda t: (t[0] if math.isfinite(t[0]) else -1, t[1]))
        chosen += [(c, "worst") for _, c in order[:n]]
    taken = {c for c, _ in chosen}
    rest = [c for c in cases if c not in taken]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(rest), size=min(n, len(rest)), replace=False) if rest else []
    chosen += [(rest[i], "random") for i in sorted(pick)]
    return chosen


# --------------------------------------------------------------------------------------------- reward
def reward_in_geometry(reward_net, model, case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reward of ``model``'s own argmax action, as the reward network sees it during adaptation.

    The network and the reward network run on :meth:`to_patch` (nnU-Net preprocessing, fixed patch); the
    action and the reward map are then mapped back to the case's geometry with :meth:`from_patch` (the
    reward rides as channel 0 of a logit stack, linearly resampled; channel 1 marks the pixels the patch
    covers).

    :returns: ``(reward (H, W) float32 in [0, 1], prediction (H, W) uint8, covered (H, W) bool)``.
    """
    import torch

    patch, props = model.to_patch(case.image, case.spacing)
    with torch.no_grad():
        out = model.network(patch[None].to(model.device))
        out = out[0] if isinstance(out, (list, tuple)) else out
        action = out.argmax(1)
        r = reward_net.score(patch[None].float(), action)[0].float().cpu().numpy()
    action = action[0].cpu().numpy()
    stack = np.zeros((model.num_classes,) + r.shape, dtype=np.float32)
    stack[0] = r
    stack[1] = 1.0  # 1 inside the patch; from_patch fills outside it with a very negative logit
    back = model.from_patch(stack, props)
    pred = np.asarray(model.from_patch(action, props), dtype=np.uint8)
    return np.clip(back[0], 0.0, 1.0).astype(np.float32), pred, back[1] > 0.5


def reward_reliability(reward_net, model, cases: Sequence, n_bins: int = 10, max_auroc_pixels: int = 2_000_000,
                       seed: int = 0, progress: bool = True) -> dict:
    """Per-pixel reliability of ``reward_net`` on ``model``'s argmax predictions vs ground-truth correctness.

    The reward network scores the network's argmax action on the patch (:func:`reward_in_geometry`); reward
    and action are mapped back to the image geometry and compared with the ground truth there, over the
    pixels the patch covers. ECE and the reliability bins are exact over all those pixels; the AUROC of
    ``1 - reward`` as a detector of wrong pixels uses a seeded subsample.

    :returns: ``{"ece", "auroc", "n_pixels", "error_rate", "bins": {"edges", "confidence", "accuracy",
        "count"}}`` (lists; NaN where a bin is empty).
    """
    from tqdm import tqdm

    from rl_adapt.measures.calibration import auroc, reliability_bins

    edges = np.linspace(0.0, 1.0, n_bins + 1)
    count = np.zeros(n_bins, dtype=np.int64)
    sum_p = np.zeros(n_bins)
    sum_y = np.zeros(n_bins)
    keep_p, keep_y = [], []
    per_case = max(1, max_auroc_pixels // max(1, len(cases)))
    rng = np.random.default_rng(seed)
    for c in tqdm(cases, desc="reward", unit="img", disable=None if progress else True):
        r, pred, covered = reward_in_geometry(reward_net, model, c)
        p, y = r[covered], (pred == c.label)[covered]
        b = reliability_bins(p, y, n_bins)
        count += b.counts
        sum_p += np.nan_to_num(b.confidence) * b.counts
        sum_y += np.nan_to_num(b.accuracy) * b.counts
        if p.size:
            sel = rng.choice(p.size, size=min(per_case, p.size), replace=False)
            keep_p.append(p[sel])
            keep_y.append(y[sel])
    total = int(count.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, sum_p / np.maximum(count, 1), np.nan)
        acc = np.where(count > 0, sum_y / np.maximum(count, 1), np.nan)
    ece = float(np.nansum(count / max(total, 1) * np.abs(acc - conf))) if total else float("nan")
    ap = np.concatenate(keep_p) if keep_p else np.zeros(0)
    ay = np.concatenate(keep_y) if keep_y else np.zeros(0, bool)
    return {"ece": ece, "auroc": auroc(1.0 - ap, ~ay) if ap.size else float("nan"), "n_pixels": total,
            "error_rate": float(1.0 - sum_y.sum() / total) if total else float("nan"),
            "bins": {"edges": edges.tolist(), "confidence": conf.tolist(), "accuracy": acc.tolist(),
                     "count": count.tolist()}}


def uncertainty_map(reward_net, model, case) -> np.ndarray:
    """``1 - reward`` of ``model``'s argmax prediction in the case's geometry: (H, W) float32, 0 outside the patch."""
    r, _, covered = reward_in_geometry(reward_net, model, case)
    return np.where(covered, 1.0 - r, 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------------- main
def resolve_postprocessing(specs: Mapping[str, Path], choice: str):
    """The one postprocessing rule to apply to every model (None: raw only) and where it came from.

    :param choice: "none", "auto" (the models' own ``postprocessing.json``) or a path (see
        :attr:`EvaluateConfig.postprocessing`).
    :raises InputError: an unreadable rule, or models carrying different rules under "auto".
    """
    from rl_adapt.postprocessing import load_postprocessing

    if choice == "none":
        return None
    if choice != "auto":
        rule = load_postprocessing(Path(choice))
        if rule is None:
            raise InputError(Path(choice), "no postprocessing.json there")
        return rule
    found = {name: load_postprocessing(path) for name, path in specs.items() if Path(path).is_dir()}
    found = {name: r for name, r in found.items() if r is not None and r.steps}  # an empty rule changes nothing
    if not found:
        return None
    keys = {r.key() for r in found.values()}
    if len(keys) > 1:
        raise InputError(None, "the models carry different postprocessing rules ("
                         + "; ".join(f"{n}: {r.describe()}" for n, r in found.items())
                         + "): pass --postprocessing FILE to apply one of them to all models, or none")
    name, rule = next(iter(found.items()))
    rule.source = f"{rule.source} (model {name!r}; applied to every model)"
    return rule


def evaluate(models: Mapping[str, str | Path] | Sequence[str], data: str | Path, out: str | Path,
             reward: str | Path | None = None, config: EvaluateConfig | None = None, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Evaluate models on a labelled dataset and write the evaluation folder ``out`` (see module doc).

    :param models: ``{name: results_folder}`` in order (the first is the reference of paired tests), or
        ``["NAME=DIR", ...]``.
    :param data: labelled dataset (any format :func:`rl_adapt.data.readers.read_dataset` reads).
    :param out: new output folder (built in a temporary sibling, renamed at the end).
    :param reward: adaptation run folder (or reward_net.pt) whose reward network is scored as uncertainty.
    :param overwrite: replace an existing ``out``.
    :returns: the summary dict as written to ``summary.json`` (strict-JSON values: None for undefined).
    :raises InputError: bad model folder, unlabelled/empty/mismatched dataset, missing reward network,
        existing ``out`` without ``overwrite`` -- raised before anything is written.
    """
    import torch

    cfg = config or EvaluateConfig()
    specs = dict(models) if isinstance(models, Mapping) else parse_model_specs(models)
    specs = {str(k): Path(v) for k, v in specs.items()}
    if not specs:
        raise InputError(None, "give at least one model")
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(out, "already exists; choose a new output folder or pass --overwrite")
    for name, path in specs.items():
        if out.resolve() == path.resolve() or out.resolve() in path.resolve().parents:
            raise InputError(out, f"output folder would overwrite model {name!r}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cases = load_labelled(data, progress=progress)
    loaded = {name: load_model(path, cfg.device) for name, path in specs.items()}
    post = resolve_postprocessing(specs, cfg.postprocessing)
    if post is not None:
        log.info("postprocessing for every model: %s (from %s)", post.describe(), post.source)
    reward_net = None
    if reward is not None:
        from rl_adapt.engine.reward.network import RewardNet

        reward_net = RewardNet.load(find_reward_net(reward), device=cfg.device)
    timings["load"] = time.perf_counter() - t0

    from tqdm import tqdm

    names = list(loaded)
    preds: dict[str, list[np.ndarray]] = {}
    patients = complete_patients(cases)
    runner = _Runner(cfg.workers, cfg.torch_threads)
    cpu0 = _cpu_seconds()
    threads_before = torch.get_num_threads()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    try:
        t0 = time.perf_counter()
        img_futs: dict[str, list[Future]] = {}
        clin_futs: dict[tuple[str, str], Future] = {}
        pp_img_futs: dict[str, list[Future]] = {}
        pp_clin_futs: dict[tuple[str, str], Future] = {}
        for patient, idx in patients.items():
            sel = [cases[i] for i in idx]
            clin_futs[("", patient)] = runner.submit(patient_indices_or_empty, sel, [c.label for c in sel])
        with torch.inference_mode():
            for name, model in loaded.items():
                masks, futs = [], []
                for c in tqdm(cases, desc=f"predict {name}", unit="img", disable=None if progress else True):
                    m = np.asarray(model.predict(c.image, c.spacing, mirror=cfg.mirror), dtype=np.uint8)
                    if m.shape != c.label.shape:
                        raise InputError(c.source or data, f"{c.name}: model {name!r} returned shape {m.shape}, "
                                                           f"label is {c.label.shape}")
                    masks.append(m)
                    futs.append(runner.submit(score_image, m, c.label, tuple(c.spacing)))
                preds[name], img_futs[name] = masks, futs
                for patient, idx in patients.items():
                    clin_futs[(name, patient)] = runner.submit(
                        patient_indices_or_empty, [cases[i] for i in idx], [masks[i] for i in idx])
                if post is not None:
                    pp_masks = [np.asarray(post(m), dtype=np.uint8) for m in masks]
                    pp_img_futs[name] = [runner.submit(score_image, m, c.label, tuple(c.spacing))
                                         for m, c in zip(pp_masks, cases)]
                    for patient, idx in patients.items():
                        pp_clin_futs[(name, patient)] = runner.submit(
                            patient_indices_or_empty, [cases[i] for i in idx], [pp_masks[i] for i in idx])
        timings["predict"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        def collect_images(futures: Mapping[str, list[Future]], tag: str) -> list[dict]:
            rows: list[dict] = []
            for n in names:
                for c, fut in zip(cases, tqdm(futures[n], desc=f"metrics {n}{tag}", unit="img",
                                              disable=None if progress else True)):
                    head = {"case": c.name, "patient": c.meta.get("patient", ""), "view": c.meta.get("view", ""),
                            "phase": c.meta.get("phase", ""), "model": n}
                    rows.append({**head, **fut.result()})
            return rows

        def collect_patients(futures: Mapping[tuple[str, str], Future]) -> list[dict]:
            rows = []
            for patient, idx in patients.items():
                ref = clin_futs[("", patient)].result()
                meta = {k: cases[idx[0]].meta.get(k) for k in ("EF", "EDV", "ESV")}
                for n in names:
                    rows.append(clinical_row(patient, n, futures[(n, patient)].result(), ref, meta))
            return rows

        image_rows = collect_images(img_futs, "")
        pp_image_rows = collect_images(pp_img_futs, " (postprocessed)") if post is not None else []
        timings["metrics"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        patient_rows = collect_patients(clin_futs)
        pp_patient_rows = collect_patients(pp_clin_futs) if post is not None else []
        timings["clinical"] = time.perf_counter() - t0
    finally:
        runner.close()
        torch.set_num_threads(threads_before)
    timings["cpu_predict_metrics_clinical"] = _cpu_seconds() - cpu0

    rel, ece = None, None
    if reward_net is not None:
        t0 = time.perf_counter()
        rel = reward_reliability(reward_net, loaded[names[0]], cases, n_bins=cfg.reliability_bins,
                                 seed=cfg.seed, progress=progress)
        rel.update({"model": names[0], "reward_run": str(reward)})
        ece = {names[0]: rel["ece"]}
        timings["reward"] = time.perf_counter() - t0

    summary = summarise(image_rows, patient_rows, names, ece=ece, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    if post is not None:
        summary["postprocessed"] = summarise(pp_image_rows, pp_patient_rows, names, n_bootstrap=cfg.n_bootstrap,
                                             seed=cfg.seed)
        summary["postprocessing"] = {**post.to_json(), "rule": post.describe(), "source": post.source,
                                     "applied_to": names}

    t0 = time.perf_counter()
    chosen = select_overlays(image_rows, [c.name for c in cases], names, cfg.overlays, cfg.seed)
    overlays = _overlay_arrays(chosen, cases, preds, image_rows, names, cfg.thumb_size,
                               reward_net, loaded[names[0]])
    timings["overlays"] = time.perf_counter() - t0

    check_cols = []
    for r in image_rows:
        check_cols.extend(k for k in r if k.startswith("check_") and k not in check_cols)
    image_cols = ["case", "patient", "view", "phase", "model", *image_metric_columns(), "valid", "failed_checks",
                  *check_cols]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        tmp = Path(tmp)
        write_csv(tmp / "per_image.csv", image_rows, image_cols)
        write_csv(tmp / "per_patient.csv", patient_rows, _patient_columns())
        if post is not None:
            (tmp / "postprocessed").mkdir()
            write_csv(tmp / "postprocessed" / "per_image.csv", pp_image_rows, image_cols)
            write_csv(tmp / "postprocessed" / "per_patient.csv", pp_patient_rows, _patient_columns())
        write_json_atomic(tmp / "summary.json", json_clean(summary))
        if rel is not None:
            write_json_atomic(tmp / "reliability.json", json_clean(rel))
        if overlays is not None:
            np.savez_compressed(tmp / "overlays.npz", **overlays)
        write_json_atomic(tmp / "inputs.json", {"models": {n: str(p) for n, p in specs.items()}, "data": str(data),
                                                 "reward": None if reward is None else str(reward),
                                                 "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}})
        if cfg.report:
            from rl_adapt.evaluation.report import write_report

            t0 = time.perf_counter()
            write_json_atomic(tmp / "timings.json", {k: round(v, 3) for k, v in timings.items()})
            write_report(tmp)
            timings["report"] = time.perf_counter() - t0
        write_json_atomic(tmp / "timings.json", {k: round(v, 3) for k, v in timings.items()})
    log.info("evaluation written to %s (%s)", out, ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return json_clean(summary)


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (user + system)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _patient_columns() -> list[str]:
    cols = ["patient", "model"]
    for key in CLINICAL:
        cols += [f"{key}_pred", f"{key}_ref", f"{key}_err"] + ([f"{key}_err_pct"] if key in VOLUMES else [])
    for key in ("EF", "EDV", "ESV"):
        cols += [f"{key}_meta", f"{key}_err_meta"]
    return cols


def _overlay_arrays(chosen: Sequence[tuple[str, str]], cases: Sequence, preds: Mapping[str, Sequence[np.ndarray]],
                    image_rows: Sequence[Mapping], names: Sequence[str], size: int, reward_net=None,
                    first_model=None) -> dict | None:
    """Arrays of ``overlays.npz``: thumbnails padded to a common (h, w) with their true ``shape``."""
    if not chosen:
        return None
    index = {c.name: i for i, c in enumerate(cases)}
    dice = {(r["model"], r["case"]): _f(r.get("mean_dice")) for r in image_rows}
    thumbs = []
    for name, _ in chosen:
        c = cases[index[name]]
        ri, ci = thumb_index(c.image.shape[:2], size)
        t = {"image": image_to_uint8(c.image)[np.ix_(ri, ci)], "gt": c.label[np.ix_(ri, ci)],
             "pred": [preds[n][index[name]][np.ix_(ri, ci)] for n in names]}
        if reward_net is not None:
            t["unc"] = uncertainty_map(reward_net, first_model, c)[np.ix_(ri, ci)]
        thumbs.append(t)
    h = max(t["image"].shape[0] for t in thumbs)
    w = max(t["image"].shape[1] for t in thumbs)

    def pad(a: np.ndarray, dtype) -> np.ndarray:
        o = np.zeros((h, w), dtype=dtype)
        o[: a.shape[0], : a.shape[1]] = a
        return o

    out = {
        "case": np.array([n for n, _ in chosen]),
        "group": np.array([g for _, g in chosen]),
        "models": np.array(list(names)),
        "shape": np.array([t["image"].shape for t in thumbs], dtype=np.int32),
        "image": np.stack([pad(t["image"], np.uint8) for t in thumbs]),
        "gt": np.stack([pad(t["gt"], np.uint8) for t in thumbs]),
        "pred": np.stack([np.stack([pad(t["pred"][j], np.uint8) for t in thumbs]) for j in range(len(names))]),
        "dice": np.array([[dice.get((n, c), np.nan) for c, _ in chosen] for n in names], dtype=np.float64),
    }
    if reward_net is not None:
        out["uncertainty"] = np.stack([pad(t["unc"], np.float16) for t in thumbs])
    return out
