"""``report.html``: one self-contained page built from the files :mod:`rl_adapt.evaluation.evaluate` wrote.

The report never touches a model: it reads ``summary.json``, ``per_image.csv``, ``per_patient.csv``,
and when present ``reliability.json`` and ``overlays.npz`` from the evaluation folder. Figures are drawn
with matplotlib's Agg backend and embedded as base64 PNG, so the page opens anywhere, offline.

Sections: summary table (means with 95 % bootstrap CIs), paired comparisons, Dice / HD95 distributions per
structure and model, validity per anatomical check, EF scatter and Bland--Altman (when clinical indices
exist), the reward network's reliability diagram (when present), and overlays of the cases where the
last model helped most / hurt most relative to the first, plus a random few.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rl_adapt.errors import InputError
from rl_adapt.io_utils import write_text_atomic
from rl_adapt.evaluation.scoring import TEXT_COLUMNS
from rl_adapt.io_utils import read_csv
from rl_adapt.measures.statistics import bootstrap_ci

log = logging.getLogger(__name__)

LABEL_COLOURS: dict[int, tuple[float, float, float]] = {1: (0.90, 0.20, 0.20), 2: (0.20, 0.75, 0.30),
                                                       3: (0.25, 0.45, 0.95)}
"""Overlay colour (RGB in [0, 1]) per label: LV red, MYO green, LA blue."""
MODEL_COLOURS: tuple[str, ...] = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860",
                                  "#da8bc3", "#8c8c8c")
"""Colour of each model, in the order of ``summary.json``."""

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1f2328}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
header{background:#1f3a5f;color:#fff;padding:22px 28px}
header h1{margin:0 auto;max-width:1180px;font-size:24px;font-weight:600}
header p{margin:6px auto 0;max-width:1180px;opacity:.85;font-size:14px}
section{background:#fff;border:1px solid #dfe2e6;border-radius:8px;padding:18px 22px;margin:18px 0}
h2{font-size:18px;margin:0 0 10px;color:#1f3a5f}
p.note{color:#57606a;font-size:13px;margin:6px 0 10px}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{padding:6px 8px;border-bottom:1px solid #e6e8eb;text-align:right;white-space:nowrap}
th{background:#f0f2f5;font-weight:600}
th:first-child,td:first-child{text-align:left}
tr:nth-child(even) td{background:#fafbfc}
td .ci{color:#6e7781;font-size:11px;display:block}
td.best{font-weight:700;color:#0b6b2f}
img.fig{max-width:100%;display:block;margin:8px auto}
.kpis{display:flex;gap:12px;flex-wrap:wrap;margin:4px 0 0}
.kpi{background:#f0f4fa;border-radius:6px;padding:8px 14px;font-size:13px}
.kpi b{display:block;font-size:18px;color:#1f3a5f}
.warnings{border-left:4px solid #d4a72c;background:#fff8e5}
.legend span{display:inline-block;margin-right:14px;font-size:13px}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.scroll{overflow-x:auto}
code{background:#f0f2f5;padding:1px 4px;border-radius:3px}
footer{color:#6e7781;font-size:12px;text-align:center;margin-top:24px}
"""


# --------------------------------------------------------------------------------------------- helpers
def _png(fig) -> str:
    """Render a matplotlib figure to a ``data:image/png;base64,...`` URI and close it."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img class="fig" alt="{html.escape(alt)}" src="{uri}">'


def _fmt(x: Any, digits: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "–"
    return "–" if not math.isfinite(v) else f"{v:.{digits}f}"


def _finite(values) -> np.ndarray:
    arr = np.asarray([float(v) if v is not None else float("nan") for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


def _col(rows: Sequence[Mapping], key: str, model: str | None = None) -> np.ndarray:
    return _finite(r.get(key) for r in rows if model is None or r.get("model") == model)


def _pyplot():  # noqa: ANN202 - returns the matplotlib.pyplot module
    """pyplot on the Agg backend, imported here (not at the top) so that importing this module never changes the
    backend of a user's session (e.g. a notebook's inline one) until a figure is actually drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


# --------------------------------------------------------------------------------------------- figures
def distribution_figure(image_rows: Sequence[Mapping], models: Sequence[str], metric: str,
                        structures: Sequence[str] = ("LV", "MYO", "LA", "epi")) -> str:
    """Violin + box plot of ``metric`` per structure (one panel each) and model; returns a PNG data URI."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(structures), figsize=(2.8 * len(structures), 2.9), squeeze=False)
    for ax, s in zip(axes[0], structures):
        data = [_col(image_rows, f"{s}_{metric}", m) for m in models]
        pos = [i + 1 for i, d in enumerate(data) if d.size]
        present = [d for d in data if d.size]
        if present:
            parts = ax.violinplot(present, positions=pos, showextrema=False, widths=0.8)
            for body, p in zip(parts["bodies"], pos):
                body.set_facecolor(MODEL_COLOURS[(p - 1) % len(MODEL_COLOURS)])
                body.set_alpha(0.35)
            ax.boxplot(present, positions=pos, widths=0.25, showfliers=False,
                       medianprops={"color": "black"}, patch_artist=False)
        ax.set_xticks(range(1, len(models) + 1))
        ax.set_xticklabels([_short(m) for m in models], rotation=20 if len(models) > 2 else 0)
        ax.set_title(s)
        ax.grid(axis="y", alpha=0.3)
        if metric == "dice":
            lo = min([0.5] + [float(np.percentile(d, 2)) for d in present])
            ax.set_ylim(max(0.0, lo - 0.02), 1.0)
    axes[0][0].set_ylabel("Dice" if metric == "dice" else f"{metric.upper()} (mm)")
    fig.tight_layout()
    return _png(fig)


def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def check_names(image_rows: Sequence[Mapping]) -> list[str]:
    """Anatomical check names present in ``per_image.csv`` (``check_<name>`` columns), in column order."""
    names: list[str] = []
    for r in image_rows:
        for k in r:
            if k.startswith("check_") and k[6:] not in names:
                names.append(k[6:])
    return names


def validity_figure(image_rows: Sequence[Mapping], models: Sequence[str]) -> str:
    """Grouped horizontal bars: pass rate per anatomical check (and all checks) per model."""
    plt = _pyplot()
    checks = check_names(image_rows)
    labels = ["all checks (valid)"] + checks
    n, k = len(labels), len(models)
    fig, ax = plt.subplots(figsize=(9, 0.35 * n * max(1, k) * 0.6 + 1.2))
    h = 0.8 / max(k, 1)
    for j, m in enumerate(models):
        rates = [np.mean(_col(image_rows, "valid", m)) if _col(image_rows, "valid", m).size else np.nan]
        for c in checks:
            v = _col(image_rows, f"check_{c}", m)
            rates.append(float(v.mean()) if v.size else np.nan)
        y = np.arange(n) + (j - (k - 1) / 2) * h
        ax.barh(y, rates, height=h, color=MODEL_COLOURS[j % len(MODEL_COLOURS)], label=m)
        for yy, rr in zip(y, rates):
            if np.isfinite(rr):
                ax.text(min(rr, 1.0) + 0.005, yy, f"{100 * rr:.1f}%", va="center", fontsize=7)
    ax.set_yticks(np.arange(n))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.09)
    ax.set_xlabel("fraction of images passing")
    ax.legend(loc="lower left", fontsize=8, frameon=False, bbox_to_anchor=(0, 1.0), ncol=min(k, 4))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def clinical_figure(patient_rows: Sequence[Mapping], models: Sequence[str], index: str = "EF") -> str | None:
    """Scatter (predicted vs reference) and Bland--Altman of a patient index per model; None if no data."""
    plt = _pyplot()
    pairs = {}
    for m in models:
        p = np.array([[float(r.get(f"{index}_pred", np.nan)), float(r.get(f"{index}_ref", np.nan))]
                      for r in patient_rows if r.get("model") == m], dtype=np.float64).reshape(-1, 2)
        p = p[np.isfinite(p).all(axis=1)]
        if p.size:
            pairs[m] = p
    if not pairs:
        return None
    unit = "%" if index in ("EF", "GLS_2CH", "GLS_4CH") else "ml"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    allv = np.concatenate(list(pairs.values()))
    lo, hi = float(allv.min()), float(allv.max())
    pad = 0.05 * (hi - lo + 1e-6)
    a1.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#888", lw=1, ls="--")
    for j, m in enumerate(models):
        if m not in pairs:
            continue
        c = MODEL_COLOURS[j % len(MODEL_COLOURS)]
        pred, ref = pairs[m][:, 0], pairs[m][:, 1]
        r = float(np.corrcoef(pred, ref)[0, 1]) if pred.size > 2 and pred.std() > 0 and ref.std() > 0 else float("nan")
        a1.scatter(ref, pred, s=14, alpha=0.7, color=c, label=f"{m} (r={_fmt(r, 2)})")
        mean, diff = (pred + ref) / 2, pred - ref
        bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if diff.size > 1 else 0.0
        a2.scatter(mean, diff, s=14, alpha=0.7, color=c, label=f"{m}: bias {bias:+.2f}, LoA ±{1.96 * sd:.2f}")
        a2.axhline(bias, color=c, lw=1.2)
        for s in (-1.96, 1.96):
            a2.axhline(bias + s * sd, color=c, lw=0.8, ls=":")
    a1.set_xlabel(f"{index} reference, from ground-truth masks ({unit})")
    a1.set_ylabel(f"{index} predicted ({unit})")
    a1.set_title(f"{index}: predicted vs reference")
    a1.legend(fontsize=8, frameon=False)
    a2.axhline(0, color="#888", lw=0.8)
    a2.set_xlabel(f"mean of predicted and reference ({unit})")
    a2.set_ylabel(f"predicted − reference ({unit})")
    a2.set_title(f"{index}: Bland–Altman (bias, 95 % limits of agreement)")
    a2.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def reliability_figure(rel: Mapping[str, Any]) -> str:
    """Reliability diagram of the reward network: accuracy vs confidence per bin, with pixel counts."""
    plt = _pyplot()
    conf = np.asarray([np.nan if v is None else v for v in rel["bins"]["confidence"]], dtype=float)
    acc = np.asarray([np.nan if v is None else v for v in rel["bins"]["accuracy"]], dtype=float)
    cnt = np.asarray(rel["bins"]["count"], dtype=float)
    edges = np.asarray(rel["bins"]["edges"], dtype=float)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1.3, 1]})
    width = np.diff(edges)
    ok = cnt > 0
    a1.bar(edges[:-1][ok], acc[ok], width=width[ok], align="edge", color="#4c72b0", alpha=0.8,
           edgecolor="white", label="observed accuracy")
    a1.bar(edges[:-1][ok], (conf - acc)[ok], bottom=acc[ok], width=width[ok], align="edge",
           color="#c44e52", alpha=0.35, edgecolor="white", label="gap to confidence")
    a1.plot([0, 1], [0, 1], ls="--", color="#555", lw=1, label="perfect calibration")
    a1.set_xlim(0, 1)
    a1.set_ylim(0, 1)
    a1.set_xlabel("reward (predicted probability that the pixel is correct)")
    a1.set_ylabel("fraction of pixels actually correct")
    a1.set_title(f"Reliability of the reward network — ECE {_fmt(rel.get('ece'), 3)}")
    a1.legend(fontsize=8, frameon=False, loc="upper left")
    a2.bar(edges[:-1], cnt / max(cnt.sum(), 1), width=width, align="edge", color="#8172b3", edgecolor="white")
    a2.set_xlim(0, 1)
    a2.set_xlabel("reward")
    a2.set_ylabel("fraction of pixels")
    a2.set_title("Pixels per bin")
    fig.tight_layout()
    return _png(fig)


def colour_overlay(image: np.ndarray, mask: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
    """RGB (H, W, 3) float image in [0, 1]: grey ``image`` (uint8) with ``mask`` labels tinted on top."""
    g = np.asarray(image, dtype=np.float32) / 255.0
    rgb = np.repeat(g[..., None], 3, axis=-1)
    if mask is not None:
        for lab, col in LABEL_COLOURS.items():
            sel = mask == lab
            rgb[sel] = (1 - alpha) * rgb[sel] + alpha * np.asarray(col, dtype=np.float32)
    return np.clip(rgb, 0, 1)


def overlay_figure(ov: Mapping[str, np.ndarray], rows: Sequence[int], models: Sequence[str]) -> str:
    """One row per case: image, ground truth, each model's mask (Dice in the title), uncertainty if saved."""
    plt = _pyplot()
    has_unc = "uncertainty" in ov
    ncol = 2 + len(models) + int(has_unc)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.9 * ncol, 2.05 * len(rows)), squeeze=False)
    for i, idx in enumerate(rows):
        h, w = (int(v) for v in ov["shape"][idx])
        img = ov["image"][idx][:h, :w]
        panels = [("image", None, colour_overlay(img, None)),
                  ("ground truth", None, colour_overlay(img, ov["gt"][idx][:h, :w]))]
        for j, m in enumerate(models):
            panels.append((_short(m), f"Dice {_fmt(ov['dice'][j][idx], 3)}", colour_overlay(img, ov["pred"][j][idx][:h, :w])))
        for j, (title, tag, arr) in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(arr, interpolation="nearest")
            if i == 0:
                ax.set_title(title, fontsize=8.5)
            if tag:
                ax.text(0.03, 0.97, tag, transform=ax.transAxes, va="top", ha="left", fontsize=7.5, color="white",
                        bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.5, "edgecolor": "none"})
        if has_unc:
            ax = axes[i][ncol - 1]
            ax.imshow(np.asarray(ov["uncertainty"][idx][:h, :w], dtype=np.float32), cmap="magma", vmin=0, vmax=1,
                      interpolation="nearest")
            if i == 0:
                ax.set_title(f"uncertainty (1 − reward, {_short(models[0])})", fontsize=8.5)
        axes[i][0].set_ylabel(_short(str(ov["case"][idx]), 24), fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------------------------- tables
def _ci_cell(v: Any, values: np.ndarray, digits: int, best: bool, n_bootstrap: int, seed: int,
             scale: float = 1.0, suffix: str = "") -> str:
    lo, hi = bootstrap_ci(values, n_bootstrap, seed)
    cls = ' class="best"' if best else ""
    return (f"<td{cls}>{_fmt(scale * _num(v), digits)}{suffix}<span class='ci'>[{_fmt(scale * lo, digits)}, "
            f"{_fmt(scale * hi, digits)}]</span></td>")


def summary_table(summary: Mapping, image_rows: Sequence[Mapping], n_bootstrap: int = 1000, seed: int = 0) -> str:
    """Two HTML tables per model: Dice per structure + validity, then HD95 + clinical errors + ECE.

    Image-level values are shown with their 95 % bootstrap CI over images (grey); bold marks the best model.
    """
    models = list(summary["models"])

    def best_of(metric: str, s: str, higher: bool) -> float | None:
        vals = [_num(summary["models"][n][metric][s]) for n in models]
        vals = [v for v in vals if math.isfinite(v)]
        if len(models) < 2 or not vals:
            return None
        return max(vals) if higher else min(vals)

    seg_s = ("LV", "MYO", "LA", "epi", "mean")
    dist_s = ("LV", "MYO", "LA", "epi", "mean")
    vbest = [_num(summary["models"][n]["validity_rate"]) for n in models]
    vbest = max([v for v in vbest if math.isfinite(v)], default=None) if len(models) > 1 else None
    t1 = ["<tr><th>model</th>" + "".join(f"<th>Dice {s}</th>" for s in seg_s) + "<th>anatomically valid</th></tr>"]
    t2 = ["<tr><th>model</th>" + "".join(f"<th>HD95 {s} (mm)</th>" for s in dist_s)
          + "<th>EF MAE (points)</th><th>EDV MAE (%)</th><th>ESV MAE (%)</th><th>reward ECE</th></tr>"]
    for n in models:
        e = summary["models"][n]
        r1 = [f"<td>{html.escape(n)}</td>"]
        for s in seg_s:
            b = best_of("dice", s, True)
            r1.append(_ci_cell(e["dice"][s], _col(image_rows, f"{s}_dice", n), 3,
                               b is not None and _num(e["dice"][s]) == b, n_bootstrap, seed))
        v = _num(e["validity_rate"])
        r1.append(_ci_cell(v, _col(image_rows, "valid", n), 1, vbest is not None and v == vbest,
                           n_bootstrap, seed, scale=100.0, suffix="%"))
        t1.append("<tr>" + "".join(r1) + "</tr>")
        r2 = [f"<td>{html.escape(n)}</td>"]
        for s in dist_s:
            b = best_of("hd95", s, False)
            r2.append(_ci_cell(e["hd95"][s], _col(image_rows, f"{s}_hd95", n), 2,
                               b is not None and _num(e["hd95"][s]) == b, n_bootstrap, seed))
        r2 += [f"<td>{_fmt(e['ef_mae'], 2)}</td>", f"<td>{_fmt(e['edv_mae_pct'], 1)}</td>",
               f"<td>{_fmt(e['esv_mae_pct'], 1)}</td>", f"<td>{_fmt(e['ece'], 3)}</td>"]
        t2.append("<tr>" + "".join(r2) + "</tr>")
    return (f"<div class='scroll'><table>{''.join(t1)}</table></div>"
            f"<div class='scroll' style='margin-top:12px'><table>{''.join(t2)}</table></div>")


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def paired_table(summary: Mapping) -> str:
    """HTML table of the paired comparisons (every model against the first, then the ``--compare`` pairs)."""
    n = summary.get("counts", {}).get("paired", {})
    rows = []
    for key, st in summary.get("paired", {}).items():
        ci = st.get("ci95") or [None, None]
        p = st.get("wilcoxon_p")
        p_txt = "–" if p is None else (f"{p:.2e}" if p < 1e-3 else f"{p:.3f}")
        rows.append(f"<tr><td>{html.escape(key)}</td><td>{_fmt(st.get('dice_mean_diff'), 4)}</td>"
                    f"<td>[{_fmt(ci[0], 4)}, {_fmt(ci[1], 4)}]</td><td>{p_txt}</td><td>{n.get(key, '–')}</td></tr>")
    head = "<tr><th>comparison</th><th>Δ mean Dice</th><th>95 % CI</th><th>Wilcoxon p</th><th>images</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


# --------------------------------------------------------------------------------------------- page
def _load(folder: Path) -> tuple[dict, list[dict], list[dict], dict | None, dict | None]:
    need = [folder / "summary.json", folder / "per_image.csv"]
    for p in need:
        if not p.is_file():
            raise InputError(p, "missing: the report is built from the files `rl-adapt evaluate` writes")
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(folder / "summary.json", f"not valid JSON ({exc})") from exc
    image_rows = read_csv(folder / "per_image.csv", TEXT_COLUMNS)
    patient_rows = read_csv(folder / "per_patient.csv", TEXT_COLUMNS) if (folder / "per_patient.csv").is_file() else []
    rel = None
    if (folder / "reliability.json").is_file():
        rel = json.loads((folder / "reliability.json").read_text(encoding="utf-8"))
    ov = None
    if (folder / "overlays.npz").is_file():
        with np.load(folder / "overlays.npz", allow_pickle=False) as z:
            ov = {k: z[k] for k in z.files}
    return summary, image_rows, patient_rows, rel, ov


def build_report(folder: str | Path, title: str = "rl-adapt evaluation") -> str:
    """The report page (HTML text) for an evaluation folder written by :func:`rl_adapt.evaluation.evaluate.evaluate`.

    :param folder: holds summary.json and per_image.csv (+ optional per_patient.csv, reliability.json,
        overlays.npz, timings.json).
    :raises InputError: when the required files are missing or unreadable.
    """
    folder = Path(folder)
    summary, image_rows, patient_rows, rel, ov = _load(folder)
    models = list(summary["models"])
    legend = "".join(f'<span><i style="background:{MODEL_COLOURS[j % len(MODEL_COLOURS)]}"></i>{html.escape(m)}</span>'
                     for j, m in enumerate(models))
    parts = [f"<header><h1>{html.escape(title)}</h1><p>{summary['n_images']} images · {summary['n_patients']} "
             f"patients · {len(models)} model(s): {html.escape(', '.join(models))} · generated "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p></header><main>"]
    warnings = [w.get("message") for w in (summary.get("warnings") or {}).values()
                if isinstance(w, dict) and w.get("count") and w.get("message")]
    if warnings:
        parts.append("<section class='warnings'><h2>Warnings</h2><ul>"
                     + "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings) + "</ul></section>")
    kpi = []
    for m in models:
        e = summary["models"][m]
        kpi.append(f"<div class='kpi'>{html.escape(m)}<b>Dice {_fmt(e['dice']['mean'], 3)} · valid "
                   f"{_fmt(100 * _num(e['validity_rate']), 1)}%</b></div>")
    parts.append("<section><h2>Summary</h2><div class='kpis'>" + "".join(kpi) + "</div>"
                 "<p class='note'>Means over images (NaN-aware: an undefined distance for an empty structure is "
                 "left out and counted in summary.json); grey: 95 % bootstrap CI over images. Clinical errors are "
                 "per patient against indices computed the same way on the ground-truth masks. Bold: best.</p>"
                 + "".join(f"<p class='note'>{html.escape(m)} maps each image toward the source scanner's look "
                           "before its network (the harmonization.npz of its folder, fitted label-free).</p>"
                           for m in summary.get("harmonized_inputs") or [])
                 + summary_table(summary, image_rows) + "</section>")
    if summary.get("paired"):
        parts.append(f"<section><h2>Paired comparisons (reference: {html.escape(models[0])})</h2>"
                     "<p class='note'>Per-image difference of mean Dice (LV, MYO, LA) of each model against the "
                     "first (and of the pairs asked for with --compare: A vs B is A - B), bootstrap 95 % CI over "
                     "images and two-sided Wilcoxon signed-rank test on the same images.</p>"
                     + paired_table(summary) + "</section>")
    post = summary.get("postprocessed")
    pp_rows_path = folder / "postprocessed" / "per_image.csv"
    if post and pp_rows_path.is_file():
        rule = summary.get("postprocessing") or {}
        parts.append("<section><h2>Postprocessed outputs</h2><p class='note'>The tables above are the raw network "
                     "outputs. Here every model's outputs went through the same postprocessing rule, "
                     f"<code>{html.escape(str(rule.get('rule', '')))}</code> (from "
                     f"<code>{html.escape(str(rule.get('source', '')))}</code>), applied as nnU-Net applies its "
                     "postprocessing.pkl; paired differences against the first model postprocessed the same way.</p>"
                     + summary_table(post, read_csv(pp_rows_path, TEXT_COLUMNS)) + paired_table(post) + "</section>")
    parts.append("<section><h2>Dice per structure</h2><div class='legend'>" + legend + "</div>"
                 + _img(distribution_figure(image_rows, models, "dice"), "Dice distributions") + "</section>")
    parts.append("<section><h2>HD95 per structure (mm)</h2><div class='legend'>" + legend + "</div>"
                 + _img(distribution_figure(image_rows, models, "hd95"), "HD95 distributions") + "</section>")
    parts.append("<section><h2>Anatomical validity per check</h2><p class='note'>Fraction of predicted masks "
                 "passing each anatomical check; an image is valid when it passes all of them.</p>"
                 + _img(validity_figure(image_rows, models), "validity per check") + "</section>")
    if patient_rows:
        ef = clinical_figure(patient_rows, models, "EF")
        if ef:
            parts.append("<section><h2>Ejection fraction</h2><p class='note'>Biplane Simpson indices from "
                         "2CH and 4CH at ED and ES; reference = the same computation on the ground-truth "
                         f"masks ({len({r['patient'] for r in patient_rows})} patients).</p>"
                         + _img(ef, "EF scatter and Bland-Altman") + "</section>")
    if rel:
        parts.append(f"<section><h2>Reward network as uncertainty</h2><p class='note'>Per-pixel reward of "
                     f"<code>{html.escape(str(rel.get('reward_run', '')))}</code> on the predictions of "
                     f"{html.escape(str(rel.get('model', models[0])))} against whether each pixel is correct; "
                     f"{int(rel.get('n_pixels', 0)):,} pixels, ECE {_fmt(rel.get('ece'), 3)}, AUROC "
                     f"{_fmt(rel.get('auroc'), 3)}; within {rel.get('border_px')} px of a border, AUROC "
                     f"{_fmt(rel.get('border', {}).get('auroc'), 3)}. The model's own softmax confidence on the "
                     f"same pixels: AUROC {_fmt(rel.get('policy_confidence', {}).get('everywhere', {}).get('auroc'), 3)}"
                     f", near a border {_fmt(rel.get('policy_confidence', {}).get('border', {}).get('auroc'), 3)} "
                     "(a reward above these knows more about the masks than the model does).</p>"
                     + _img(reliability_figure(rel), "reliability diagram")
                     + "</section>")
    if ov is not None and len(ov.get("case", [])):
        groups = [str(g) for g in ov["group"]]
        titles = {"helped": f"Where {models[-1]} helped most (vs {models[0]})",
                  "hurt": f"Where {models[-1]} hurt most (vs {models[0]})",
                  "worst": "Lowest Dice", "random": "Random cases"}
        ov_models = [str(m) for m in ov["models"]]
        for g in ("helped", "hurt", "worst", "random"):
            idx = [i for i, x in enumerate(groups) if x == g]
            if idx:
                parts.append(f"<section><h2>{html.escape(titles[g])}</h2><p class='note'>Red LV, green MYO, "
                             "blue LA; Dice = mean over LV, MYO, LA.</p>"
                             + _img(overlay_figure(ov, idx, ov_models), titles[g]) + "</section>")
    timings = folder / "timings.json"
    t_txt = ""
    if timings.is_file():
        t = json.loads(timings.read_text(encoding="utf-8"))
        t_txt = " · " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if isinstance(v, (int, float)))
    parts.append(f"<footer>rl-adapt evaluate{html.escape(t_txt)}</footer></main>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title><style>{CSS}</style>"
            "</head><body>" + "".join(parts) + "</body></html>\n")


def write_report(folder: str | Path, out: str | Path | None = None, title: str = "rl-adapt evaluation") -> Path:
    """Write ``report.html`` (atomically) for an evaluation folder; returns its path.

    :param out: destination (default ``<folder>/report.html``).
    """
    folder = Path(folder)
    out = Path(out) if out is not None else folder / "report.html"
    write_text_atomic(out, build_report(folder, title=title))
    log.info("report written to %s", out)
    return out
