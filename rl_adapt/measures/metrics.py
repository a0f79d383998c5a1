"""Geometric segmentation metrics per cardiac structure: Dice, HD, HD95, ASSD (numpy/scipy only).

Structures of a CAMUS label map (0 background, 1 LV, 2 MYO, 3 LA): ``"LV"`` (1), ``"MYO"`` (2), ``"LA"`` (3)
and the epicardium ``"epi"`` = LV ∪ MYO. Distances are in mm, honouring the pixel spacing ``(row, col)``.

Definitions (identical to ``medpy.metric.binary`` with its default connectivity 1):

* surface of a binary mask ``m``: ``m XOR binary_erosion(m, cross)`` where the cross is the 4-neighbour
  structuring element and pixels outside the image count as background (so a mask touching the image edge
  has surface pixels on that edge);
* directed surface distances ``d(a -> b)``: for every surface pixel of ``a``, the Euclidean distance (mm) to
  the nearest surface pixel of ``b``;
* ``hd = max(max d(a->b), max d(b->a))``; ``hd95 = percentile_95(concat(d(a->b), d(b->a)))`` (numpy's
  default linear interpolation); ``assd = mean(concat(d(a->b), d(b->a)))``.

Empty cases (documented choice, see DESIGN.md "Metrics conventions"):

* Dice = 1.0 when both masks are empty (medpy's intended convention; medpy itself returns NaN with a
  warning on current numpy), 0.0 when exactly one is empty;
* hd / hd95 / assd = NaN when either mask is empty (medpy raises). Aggregation counts NaNs
  (:func:`rl_adapt.measures.aggregate.summarize` reports ``n_nan``) instead of inventing a number.

Efficiency: the surfaces and the two distance transforms of one structure are computed once, on the
bounding box of both masks plus a one-pixel margin (the results are exactly those of the full image), and
shared between hd, hd95 and assd.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from rl_adapt.labels import LA, LV, MYO
from rl_adapt.labels import STRUCTURES as STRUCTURE_VALUES

STRUCTURES: tuple[str, ...] = ("LV", "MYO", "LA", "epi")
"""Structures scored by :func:`segmentation_metrics`, in report order."""

STRUCTURE_LABELS: dict[str, tuple[int, ...]] = {"LV": (LV,), "MYO": (MYO,), "LA": (LA,), "epi": (LV, MYO)}
"""Label values that make up each structure."""

METRICS: tuple[str, ...] = ("dice", "hd", "hd95", "assd")
"""Metric names returned per structure by :func:`segmentation_metrics`."""


def structure_mask(label_map: np.ndarray, structure: str) -> np.ndarray:
    """Binary mask of one structure.

    :param label_map: (H, W) integer label map (0 bg, 1 LV, 2 MYO, 3 LA).
    :param structure: one of :data:`STRUCTURES`.
    :return: (H, W) bool array.
    """
    try:
        labels = STRUCTURE_LABELS[structure]
    except KeyError:
        raise ValueError(f"unknown structure {structure!r}; expected one of {STRUCTURES}") from None
    label_map = np.asarray(label_map)
    if len(labels) == 1:
        return label_map == labels[0]
    return np.isin(label_map, labels)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient ``2|a∩b| / (|a|+|b|)`` of two binary masks (any shape, nonzero = foreground).

    :return: float in [0, 1]; 1.0 when both masks are empty.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def mean_dice(a: np.ndarray, b: np.ndarray, labels: Sequence[int] = STRUCTURE_VALUES) -> float:
    """Mean over ``labels`` of the Dice of two (H, W) label maps (1.0 for a label absent from both)."""
    return float(np.mean([dice(a == lab, b == lab) for lab in labels]))


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: Sequence[int] = STRUCTURE_VALUES) -> list[float]:
    """Dice of two (H, W) label maps for each of ``labels`` (1.0 for a label absent from both)."""
    return [dice(a == lab, b == lab) for lab in labels]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface pixels of a 2D bool mask: ``mask & ~erode(mask, cross)``, outside the image = background."""
    eroded = np.zeros_like(mask)
    inner = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    eroded[1:-1, 1:-1] = inner
    return mask & ~eroded


def _crop_box(a: np.ndarray, b: np.ndarray, margin: int = 1) -> tuple[slice, slice]:
    """Bounding box of ``a | b`` grown by ``margin`` pixels and clipped to the image (both non-empty)."""
    union = a | b
    rows = np.flatnonzero(union.any(axis=1))
    cols = np.flatnonzero(union.any(axis=0))
    r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, union.shape[0])
    c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, union.shape[1])
    return slice(r0, r1), slice(c0, c1)


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray] | None:
    """Directed surface distances between two 2D binary masks.

    :param a: (H, W) binary mask (nonzero = foreground).
    :param b: (H, W) binary mask of the same shape.
    :param spacing: pixel size (row, col) in mm.
    :return: ``(d_ab, d_ba)``: float64 arrays of distances (mm) from each surface pixel of ``a`` to the surface
        of ``b`` and vice versa (ordered row-major over the pixels); ``None`` when either mask is empty.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"masks must be 2D and of equal shape, got {a.shape} and {b.shape}")
    if not a.any() or not b.any():
        return None
    rs, cs = _crop_box(a, b)
    a, b = a[rs, cs], b[rs, cs]
    # the crop boundary is either the image edge or a background margin: the surfaces are unchanged
    sa, sb = _surface(a), _surface(b)
    sampling = (float(spacing[0]), float(spacing[1]))
    dt_b = ndimage.distance_transform_edt(~sb, sampling=sampling)
    dt_a = ndimage.distance_transform_edt(~sa, sampling=sampling)
    return dt_b[sa], dt_a[sb]


def _from_distances(d: tuple[np.ndarray, np.ndarray] | None) -> dict[str, float]:
    if d is None:
        return {"hd": math.nan, "hd95": math.nan, "assd": math.nan}
    both = np.concatenate(d)
    return {
        "hd": float(max(d[0].max(), d[1].max())),
        "hd95": float(np.percentile(both, 95)),
        "assd": float(both.mean()),
    }


def hausdorff(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> float:
    """Symmetric Hausdorff distance (mm) between the surfaces of two 2D masks; NaN if either is empty."""
    return _from_distances(surface_distances(a, b, spacing))["hd"]


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> float:
    """95th percentile of the pooled symmetric surface distances (mm); NaN if either mask is empty."""
    return _from_distances(surface_distances(a, b, spacing))["hd95"]


def assd(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> float:
    """Average symmetric surface distance (mm, mean of the pooled distances); NaN if either mask is empty."""
    return _from_distances(surface_distances(a, b, spacing))["assd"]


def binary_metrics(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> dict[str, float]:
    """All four metrics of two 2D binary masks with one pair of distance transforms.

    :return: ``{"dice", "hd", "hd95", "assd"}`` (distances in mm, NaN where undefined).
    """
    out = {"dice": dice(a, b)}
    out.update(_from_distances(surface_distances(a, b, spacing)))
    return out


def segmentation_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0),
    structures: Iterable[str] = STRUCTURES,
) -> dict[str, dict[str, float]]:
    """Dice, HD, HD95 and ASSD for each structure of a predicted label map against the reference.

    :param pred: (H, W) integer label map (0 bg, 1 LV, 2 MYO, 3 LA).
    :param gt: (H, W) reference label map of the same shape.
    :param spacing: pixel size (row, col) in mm.
    :param structures: subset of :data:`STRUCTURES` to score.
    :return: ``{structure: {"dice", "hd", "hd95", "assd"}}``; floats, distances in mm, NaN where undefined
        (see the module docstring for the empty cases).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred and gt must be 2D label maps of equal shape, got {pred.shape} and {gt.shape}")
    return {
        s: binary_metrics(structure_mask(pred, s), structure_mask(gt, s), spacing) for s in structures
    }
