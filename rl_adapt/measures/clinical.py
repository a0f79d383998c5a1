"""Clinical indices from apical 2CH/4CH label maps: volumes, EF (Simpson biplane), areas, mass, GLS.

Label maps are apex up (rows = depth), labels 0 bg, 1 LV, 2 MYO, 3 LA, spacing (row, col) in mm.

Simpson's biplane method of disks, as CAMUS computes it (:func:`lv_geometry`, :func:`biplane_volume`):

1. resample the mask to isotropic pixels of size ``s = min(spacing)`` (nearest neighbour on pixel centres);
2. take the LV cavity contour (largest iso-contour at 0.5 of the largest LV component, sub-pixel);
3. mitral plane: the longest pair of contour points whose joining segment is within 45° of horizontal
   and such that one of the two contour arcs between them stays within 8 px of that segment;
4. long axis: from the midpoint of the mitral segment to the farthest contour point (apex), length ``L``;
5. 20 disks at fractions ``linspace(0, 1, 20, endpoint=False)`` of ``L`` from the mitral midpoint; at each,
   the diameter perpendicular to the axis, found by marching out from the axis on both sides in 0.5 px
   steps until the sample (nearest pixel) leaves the LV; each side's extent is the first outside step
   minus 0.25 px (the crossing lies between the last inside and the first outside sample);
6. per phase, disk height ``h = max(L_2CH, L_4CH) · s / 20`` over the two views of that phase and
   ``V = π/4 · h · Σ aᵢ bᵢ`` with ``a`` from 2CH and ``b`` from 4CH (mm → ml).

Also: single-plane disks ``π/4 · h · Σ aᵢ²`` and area–length ``8 A² / (3 π L)`` volumes, LV area (cm²),
LV length (mm), MYO area (cm²), an LV mass estimate (g) and global longitudinal strain (%).

LV mass (documented approximation, 2D apical only): ``1.05 g/ml · (V_epi − V_endo)`` with area–length
volumes of the epicardium (LV ∪ MYO, length ``L + t``) and of the cavity (length ``L``), where the mean
wall thickness is ``t = sqrt(A_epi/π) − sqrt(A_endo/π)``. This is not the ASE short-axis formula (no
short-axis view exists here); use it for relative comparisons between segmentations of the same image.

GLS: endocardial length = length (mm) of the LV contour arc from one mitral point to the other through
the apex (the mitral segment excluded); ``GLS = 100 · (ℓ_ES − ℓ_ED) / ℓ_ED`` (negative when shortening).
For a sequence, :func:`strain_curve` gives the strain of every frame relative to the first (ED).

Undefined values (no LV, no mitral plane, a missing view or phase) are NaN, never an exception.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage
from skimage import measure

log = logging.getLogger(__name__)

N_DISKS = 20
"""Number of disks of Simpson's method."""
MYO_DENSITY = 1.05
"""Myocardial density (g/ml) used by the mass estimate."""
MITRAL_MAX_ANGLE_DEG = 45.0
"""Largest angle of the mitral segment to the horizontal (degrees)."""
MITRAL_MAX_DEVIATION_PX = 8.0
"""Largest distance (isotropic px) of the mitral contour arc to the mitral segment."""
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class LVGeometry:
    """Long-axis geometry of one LV cavity in isotropic pixels (see the module docstring).

    :param spacing: isotropic pixel size s (mm).
    :param contour: (N, 2) float (row, col) closed LV contour, isotropic px.
    :param mitral: (2, 2) float (row, col) end points of the mitral segment.
    :param apex: (2,) float (row, col) apex point.
    :param length_px: long-axis length L (isotropic px).
    :param diameters_px: (20,) float disk diameters (isotropic px), base to apex.
    :param endo_length_px: contour arc length from one mitral point to the other through the apex (px).
    """

    spacing: float
    contour: np.ndarray
    mitral: np.ndarray
    apex: np.ndarray
    length_px: float
    diameters_px: np.ndarray
    endo_length_px: float

    @property
    def length_mm(self) -> float:
        """Long-axis length (mm)."""
        return self.length_px * self.spacing

    @property
    def diameters_mm(self) -> np.ndarray:
        """(20,) disk diameters (mm)."""
        return self.diameters_px * self.spacing

    @property
    def endo_length_mm(self) -> float:
        """Endocardial contour length without the mitral segment (mm)."""
        return self.endo_length_px * self.spacing


def resample_isotropic(mask: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, float]:
    """Nearest-neighbour resampling of a 2D label map to square pixels of size ``min(spacing)``.

    :param mask: (H, W) label map; :param spacing: (row, col) mm.
    :return: ``(mask_iso (H', W') same dtype, s)`` with ``H' = round(H·sr/s)``, ``W' = round(W·sc/s)``.
    """
    sr, sc = float(spacing[0]), float(spacing[1])
    s = min(sr, sc)
    if math.isclose(sr, sc):
        return np.asarray(mask), s
    h, w = mask.shape
    nh, nw = max(int(round(h * sr / s)), 1), max(int(round(w * sc / s)), 1)
    ri = np.minimum(((np.arange(nh) + 0.5) * s / sr).astype(int), h - 1)
    ci = np.minimum(((np.arange(nw) + 0.5) * s / sc).astype(int), w - 1)
    return np.asarray(mask)[np.ix_(ri, ci)], s


def _largest_component(m: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(m, structure=_EIGHT)
    if n <= 1:
        return m
    return lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def lv_contour(lv: np.ndarray) -> np.ndarray | None:
    """Closed sub-pixel contour (N, 2) float (row, col) of the largest LV component; None if empty."""
    lv = _largest_component(np.asarray(lv, dtype=bool))
    if not lv.any():
        return None
    lv = ndimage.binary_fill_holes(lv)
    contours = measure.find_contours(np.pad(lv, 1).astype(np.float32), 0.5)
    c = max(contours, key=len) - 1.0
    if np.allclose(c[0], c[-1]):
        c = c[:-1]
    return c


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances of points p (..., N, 2) to segments a-b (..., 1, 2)."""
    ab = b - a
    t = np.clip(np.sum((p - a) * ab, -1) / np.maximum(np.sum(ab * ab, -1), 1e-12), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def mitral_plane(contour: np.ndarray, max_angle_deg: float = MITRAL_MAX_ANGLE_DEG,
                 max_dev_px: float = MITRAL_MAX_DEVIATION_PX) -> tuple[int, int, np.ndarray] | None:
    """Find the mitral segment on a closed contour.

    :param contour: (N, 2) float (row, col) closed contour, isotropic px.
    :return: ``(i, j, arc)`` contour indices of the two mitral points and the indices of the contour arc
        between them that stays within ``max_dev_px`` of the segment (the mitral arc); None if none exists.
    """
    n = len(contour)
    if n < 4:
        return None
    d = contour[None, :, :] - contour[:, None, :]
    length = np.hypot(d[..., 0], d[..., 1])
    ok = np.abs(d[..., 0]) <= np.tan(np.radians(max_angle_deg)) * np.abs(d[..., 1]) + 1e-9
    iu, ju = np.nonzero(np.triu(ok & (length > 0), 1))
    order = np.argsort(-length[iu, ju], kind="stable")
    iu, ju = iu[order], ju[order]
    idx = np.arange(n)
    for start in range(0, len(iu), 8192):
        ci, cj = iu[start : start + 8192], ju[start : start + 8192]
        a, b = contour[ci], contour[cj]
        # cheap necessary condition: the points at 1/4, 1/2, 3/4 of an arc must be close to the segment
        inner_close = np.ones(len(ci), dtype=bool)
        outer_close = np.ones(len(ci), dtype=bool)
        for f in (0.25, 0.5, 0.75):
            pi = contour[(ci + np.round(f * (cj - ci)).astype(int)) % n]
            po = contour[(cj + np.round(f * (n - (cj - ci))).astype(int)) % n]
            inner_close &= _segment_distance(pi, a, b) <= max_dev_px
            outer_close &= _segment_distance(po, a, b) <= max_dev_px
        keep = np.flatnonzero(inner_close | outer_close)
        for sub in range(0, len(keep), 256):
            kk = keep[sub : sub + 256]
            ki, kj = ci[kk], cj[kk]
            dist = _segment_distance(contour[None, :, :], contour[ki][:, None, :], contour[kj][:, None, :])
            inner = (idx[None, :] >= ki[:, None]) & (idx[None, :] <= kj[:, None])
            outer = ~inner | (idx[None, :] == ki[:, None]) | (idx[None, :] == kj[:, None])
            inner_ok = np.where(inner, dist, 0).max(1) <= max_dev_px
            outer_ok = np.where(outer, dist, 0).max(1) <= max_dev_px
            hit = np.flatnonzero(inner_ok | outer_ok)
            if hit.size:
                k = hit[0]
                i, j = int(ki[k]), int(kj[k])
                arc = idx[i : j + 1] if inner_ok[k] else np.concatenate([idx[j:], idx[: i + 1]])
                return i, j, arc
    return None


def _march(lv: np.ndarray, p: np.ndarray, direction: np.ndarray, step: float = 0.5) -> float:
    """Extent (px) from p along direction until the nearest-pixel sample leaves the LV."""
    h, w = lv.shape
    s = step
    while True:
        q = p + s * direction
        r, c = int(round(q[0])), int(round(q[1]))
        if r < 0 or c < 0 or r >= h or c >= w or not lv[r, c]:
            return s - step / 2
        s += step


def lv_geometry(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0), n_disks: int = N_DISKS) -> LVGeometry | None:
    """Simpson geometry (steps 1–5 of the module docstring) of the LV (label 1) of one label map.

    :param mask: (H, W) label map; :param spacing: (row, col) mm.
    :return: an :class:`LVGeometry`, or None when there is no LV or no mitral plane.
    """
    iso, s = resample_isotropic(np.asarray(mask), spacing)
    lv = _largest_component(iso == 1)
    contour = lv_contour(lv)
    if contour is None:
        return None
    found = mitral_plane(contour)
    if found is None:
        log.warning("no mitral plane found on the LV contour")
        return None
    i, j, arc = found
    a, b = contour[i], contour[j]
    mid = (a + b) / 2
    dist = np.linalg.norm(contour - mid, axis=1)
    apex = contour[int(np.argmax(dist))]
    length = float(dist.max())
    u = (apex - mid) / max(length, 1e-12)
    nrm = np.array([-u[1], u[0]])
    lv_filled = ndimage.binary_fill_holes(lv)
    diam = np.zeros(n_disks)
    for k, t in enumerate(np.linspace(0, 1, n_disks, endpoint=False)):
        p = mid + t * length * u
        r, c = int(round(p[0])), int(round(p[1]))
        if not (0 <= r < lv.shape[0] and 0 <= c < lv.shape[1]) or not lv_filled[r, c]:
            continue
        diam[k] = _march(lv_filled, p, nrm) + _march(lv_filled, p, -nrm)
    seg = np.diff(np.vstack([contour, contour[:1]]), axis=0)
    seg_len = np.hypot(seg[:, 0], seg[:, 1])  # seg_len[k]: contour[k] -> contour[k+1]
    mitral_len = seg_len[arc[:-1]].sum() if len(arc) > 1 else 0.0
    return LVGeometry(s, contour, np.stack([a, b]), apex, length, diam, float(seg_len.sum() - mitral_len))


def biplane_volume(g2: LVGeometry | None, g4: LVGeometry | None) -> float:
    """Simpson biplane volume (ml) of one phase: ``π/4 · h · Σ aᵢ bᵢ``, ``h = max(L_2CH, L_4CH)/20`` (mm)."""
    if g2 is None or g4 is None:
        return math.nan
    h = max(g2.length_mm, g4.length_mm) / len(g2.diameters_px)
    return float(math.pi / 4 * h * np.sum(g2.diameters_mm * g4.diameters_mm) / 1000.0)


def single_plane_volume(g: LVGeometry | None) -> float:
    """Single-plane method of disks (ml): ``π/4 · (L/20) · Σ aᵢ²`` (circular disks)."""
    if g is None:
        return math.nan
    h = g.length_mm / len(g.diameters_px)
    return float(math.pi / 4 * h * np.sum(g.diameters_mm ** 2) / 1000.0)


def area_cm2(mask: np.ndarray, label: int | tuple[int, ...], spacing: Sequence[float]) -> float:
    """Area (cm²) of the pixels with the given label(s)."""
    n = np.count_nonzero(np.isin(mask, label))
    return float(n * spacing[0] * spacing[1] / 100.0)


def area_length_volume(area_mm2: float, length_mm: float) -> float:
    """Area–length volume (ml) ``8 A² / (3 π L)`` from an area (mm²) and a length (mm)."""
    if not (length_mm > 0) or not np.isfinite(area_mm2):
        return math.nan
    return float(8 * area_mm2 ** 2 / (3 * math.pi * length_mm) / 1000.0)


def lv_mass(mask: np.ndarray, spacing: Sequence[float], geometry: LVGeometry | None = None) -> float:
    """LV mass estimate (g) from one apical label map (approximation documented in the module docstring)."""
    g = geometry if geometry is not None else lv_geometry(mask, spacing)
    if g is None:
        return math.nan
    a_endo = area_cm2(mask, 1, spacing) * 100
    a_epi = area_cm2(mask, (1, 2), spacing) * 100
    t = math.sqrt(a_epi / math.pi) - math.sqrt(a_endo / math.pi)
    v = area_length_volume(a_epi, g.length_mm + t) - area_length_volume(a_endo, g.length_mm)
    return float(MYO_DENSITY * v)


def view_indices(mask: np.ndarray, spacing: Sequence[float]) -> dict[str, Any]:
    """Per-image indices: LV area (cm²), MYO area (cm²), LV length (mm), single-plane volumes (ml),
    endocardial length (mm), mass (g) and the :class:`LVGeometry` under key ``"geometry"``."""
    mask = np.asarray(mask)
    g = lv_geometry(mask, spacing)
    a_lv = area_cm2(mask, 1, spacing)
    return {
        "geometry": g,
        "LV_area": a_lv,
        "MYO_area": area_cm2(mask, 2, spacing),
        "LV_length": g.length_mm if g else math.nan,
        "endo_length": g.endo_length_mm if g else math.nan,
        "V_disks": single_plane_volume(g),
        "V_area_length": area_length_volume(a_lv * 100, g.length_mm) if g else math.nan,
        "LV_mass": lv_mass(mask, spacing, g),
    }


def strain_curve(masks: Iterable[np.ndarray], spacing: Sequence[float]) -> np.ndarray:
    """Longitudinal strain (%) of each frame of a sequence relative to the first frame (ED).

    :param masks: iterable of (H, W) label maps of one view, first = end-diastole.
    :return: (T,) float, 0 for the first frame, NaN where the contour is undefined.
    """
    lengths = []
    for m in masks:
        g = lv_geometry(m, spacing)
        lengths.append(g.endo_length_mm if g else math.nan)
    lengths = np.asarray(lengths, dtype=float)
    return 100.0 * (lengths - lengths[0]) / lengths[0]


def _ef(edv: float, esv: float) -> float:
    return float(100.0 * (edv - esv) / edv) if edv > 0 else math.nan


def _normalise(cases_or_masks: Any) -> dict[tuple[str, str], tuple[np.ndarray, tuple[float, float]]]:
    if isinstance(cases_or_masks, Mapping):
        out = {}
        for (view, phase), val in cases_or_masks.items():
            mask, spacing = val if isinstance(val, tuple) else (val, (1.0, 1.0))
            out[(str(view).upper(), str(phase).upper())] = (np.asarray(mask), tuple(spacing))
        return out
    out = {}
    for case in cases_or_masks:
        if case.label is None:
            raise ValueError(f"case {case.name} has no label map")
        view, phase = case.meta.get("view"), case.meta.get("phase")
        if view is None or phase is None:
            raise ValueError(f"case {case.name} lacks meta view/phase")
        out[(str(view).upper(), str(phase).upper())] = (np.asarray(case.label), tuple(case.spacing))
    return out


def patient_indices(cases_or_masks: Mapping[tuple[str, str], Any] | Iterable[Any]) -> dict[str, float]:
    """Clinical indices of one patient.

    :param cases_or_masks: ``{(view, phase): (mask (H, W), spacing (row, col) mm)}`` with view in
        {"2CH", "4CH"} and phase in {"ED", "ES"} (a bare mask means spacing (1, 1)), or a list of
        :class:`rl_adapt.data.case.Case` with ``label`` and meta ``view``/``phase``.
    :return: flat dict of floats (NaN where undefined):
        ``EDV``, ``ESV`` (ml), ``EF`` (%) — biplane Simpson when both views exist at a phase, otherwise the
        single-plane disks of the available view (``volume_method`` says which: "biplane", "2CH", "4CH");
        ``GLS_2CH``, ``GLS_4CH``, ``GLS`` (mean of the available, %);
        ``LV_mass`` (g, mean over the ED views); per view V: ``EDV_V``, ``ESV_V``, ``EF_V`` (single-plane
        disks), ``EDV_AL_V``, ``ESV_AL_V`` (area–length); per view and phase P: ``LV_area_V_P`` (cm²),
        ``MYO_area_V_P`` (cm²), ``LV_length_V_P`` (mm).
    """
    data = _normalise(cases_or_masks)
    per = {key: view_indices(mask, spacing) for key, (mask, spacing) in data.items()}
    out: dict[str, Any] = {}
    vols: dict[str, float] = {}
    methods = set()
    for phase in ("ED", "ES"):
        g2 = per.get(("2CH", phase), {}).get("geometry")
        g4 = per.get(("4CH", phase), {}).get("geometry")
        if ("2CH", phase) in per and ("4CH", phase) in per:
            vols[phase] = biplane_volume(g2, g4)
            methods.add("biplane")
        elif ("2CH", phase) in per or ("4CH", phase) in per:
            view = "2CH" if ("2CH", phase) in per else "4CH"
            vols[phase] = per[(view, phase)]["V_disks"]
            methods.add(view)
        else:
            vols[phase] = math.nan
    out["EDV"], out["ESV"] = vols["ED"], vols["ES"]
    out["EF"] = _ef(vols["ED"], vols["ES"])
    out["volume_method"] = "+".join(sorted(methods)) if methods else "none"
    gls = []
    for view in ("2CH", "4CH"):
        ed, es = per.get((view, "ED")), per.get((view, "ES"))
        if ed is not None and es is not None and ed["endo_length"] > 0:
            out[f"GLS_{view}"] = float(100.0 * (es["endo_length"] - ed["endo_length"]) / ed["endo_length"])
        else:
            out[f"GLS_{view}"] = math.nan
        if not math.isnan(out[f"GLS_{view}"]):
            gls.append(out[f"GLS_{view}"])
        out[f"EDV_{view}"] = ed["V_disks"] if ed else math.nan
        out[f"ESV_{view}"] = es["V_disks"] if es else math.nan
        out[f"EF_{view}"] = _ef(out[f"EDV_{view}"], out[f"ESV_{view}"])
        out[f"EDV_AL_{view}"] = ed["V_area_length"] if ed else math.nan
        out[f"ESV_AL_{view}"] = es["V_area_length"] if es else math.nan
        for phase, d in (("ED", ed), ("ES", es)):
            for k in ("LV_area", "MYO_area", "LV_length"):
                out[f"{k}_{view}_{phase}"] = d[k] if d else math.nan
    out["GLS"] = float(np.mean(gls)) if gls else math.nan
    masses = [per[(v, "ED")]["LV_mass"] for v in ("2CH", "4CH") if (v, "ED") in per]
    masses = [m for m in masses if not math.isnan(m)]
    out["LV_mass"] = float(np.mean(masses)) if masses else math.nan
    return out
