"""Anatomical validity of a 2D apical echocardiographic label map (Painchaud et al., TMI 2020; RL4Seg).

A label map (0 background, 1 LV, 2 MYO, 3 LA) is *anatomically valid* when every enabled check passes.
Each check returns one number (its *value*) compared with an inclusive range ``(min, max)`` (its
*threshold*; ``None`` = unbounded); a NaN value (a structure the check needs is missing) fails.

Conventions shared by all checks (our explicit choices where the paper is vague):

* connectivity: a structure's connected components use 8-connectivity; background regions also use
  8-connectivity, so a *hole* is a background region sealed by a 4-connected wall;
* *outside*: everything beyond the image counts as background (a background region touching the image
  edge is not a hole; erosions eat into a structure touching the edge); it never counts as a background
  pixel for the frontier ratios;
* *small* size ``s = H * W * gap_fraction`` pixels (``H*W/2**14`` by default: 4 px at 256², 3.06 px at 224²).

The checks (names as reported in :class:`CheckResult`):

``missing_structure``
    number of required structures (LV, MYO, and LA unless ``la_as_background``) with no pixel; must be 0.
``holes_in_lv`` / ``holes_in_la`` / ``holes_in_epi``
    pixels of background-or-other-label regions fully enclosed by LV, by LA, by epicardium (LV ∪ MYO); max 0.
``disconnected_lv`` / ``disconnected_myo`` / ``disconnected_la``
    pixels of the structure outside its largest 8-connected component; max 0.
``gap_lv_myo`` / ``gap_lv_la``
    for a pair (A, B) = (LV, MYO) or (LV, LA): pixels in regions sealed by A ∪ B together (holes of the
    union) that are not inside a hole of A alone or of B alone that contains no pixel of the other
    structure (those are ``holes_in_*``'s business); pass while ``<= s``. Only A and B seal the gap:
    a background line between LV and LA that opens sideways onto MYO or background is not a gap.
    (The public reference code measures the LV–MYO gap twice; here the second one really is LV–LA.)
``frontier_lv_bg``
    number of LV pixels 8-adjacent to a background pixel (label 0 inside the image), divided by the LV
    width = number of columns spanned by the LV bounding box. CAMUS preset: ``<= 0.4``; RL4Seg preset
    (LA relabelled as background, so the mitral opening counts): in ``[0.05, 1.5]``.
``frontier_myo_la``
    number of MYO pixels 8-adjacent to an LA pixel divided by the MYO width (columns spanned by the MYO
    bounding box); ``<= 0.11``.
``width_ratio_lv_myo``
    on the row ``int(mean row of LV ∪ MYO)``, LV pixel count / MYO pixel count (both counted over the
    whole row, not necessarily contiguous); ``<= 4.15``; NaN (fail) when either count is 0.
``erosion_ratio_myo``
    ``k / t`` where ``t`` is the MYO's maximal Euclidean distance (px) to the nearest non-MYO pixel and
    ``k`` is the number of 3×3 erosions after which the MYO no longer forms exactly one component
    (components smaller than ``s`` pixels are discarded after each erosion). Measured on the MYO's largest
    8-connected component (the reference code returns 0 for a MYO with any stray pixel, which double-counts
    ``disconnected_myo``). A thin neck splits early: ``>= 0.12``.

Speed: all checks run on the bounding box of the foreground (plus a frame of outside pixels), with one
labelling per quantity and a chessboard distance transform instead of repeated erosions (eroding ``k``
times by a 3×3 square keeps exactly the pixels whose chessboard distance to the background is ``> k``):
about a millisecond per 256² mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

ALL_CHECKS: tuple[str, ...] = (
    "missing_structure",
    "holes_in_lv",
    "holes_in_la",
    "holes_in_epi",
    "disconnected_lv",
    "disconnected_myo",
    "disconnected_la",
    "gap_lv_myo",
    "gap_lv_la",
    "frontier_lv_bg",
    "frontier_myo_la",
    "width_ratio_lv_myo",
    "erosion_ratio_myo",
)
"""Every check this module implements, in report order."""

LA_CHECKS: tuple[str, ...] = ("holes_in_la", "disconnected_la", "gap_lv_la", "frontier_myo_la")
"""Checks that need a left-atrium label (dropped by the RL4Seg preset)."""

_EIGHT = np.ones((3, 3), dtype=bool)
_OUTSIDE = 255  # label of the frame added around the crop


@dataclass
class AnatomyConfig:
    """Which anatomical checks run and their thresholds (see the module docstring for definitions)."""

    checks: tuple[str, ...] = ALL_CHECKS
    """names of the checks to run, a subset of ``ALL_CHECKS``."""
    la_as_background: bool = False
    """relabel LA (3) as background before checking (RL4Seg's two-structure masks); LA is then not required."""
    max_hole_pixels: int = 0
    """largest tolerated number of hole pixels in LV, LA and epicardium."""
    max_disconnected_pixels: int = 0
    """largest tolerated number of pixels outside a structure's largest component."""
    gap_fraction: float = 2.0 ** -14
    """gap (and small-object) size as a fraction of the image area H*W (H*W/2**14 in Painchaud et al.)."""
    lv_bg_frontier_min: float | None = None
    """lower bound of the LV–background frontier ratio (None: unbounded)."""
    lv_bg_frontier_max: float | None = 0.4
    """upper bound of the LV–background frontier ratio (None: unbounded)."""
    myo_la_frontier_max: float = 0.11
    """upper bound of the MYO–LA frontier ratio."""
    lv_myo_width_ratio_max: float = 4.15
    """upper bound of the LV/MYO width ratio on the centre-of-mass row."""
    myo_erosion_ratio_min: float = 0.12
    """lower bound of the MYO erosion-before-split ratio."""

    def __post_init__(self) -> None:
        unknown = [c for c in self.checks if c not in ALL_CHECKS]
        if unknown:
            raise ValueError(f"unknown anatomical check(s) {unknown}; valid: {list(ALL_CHECKS)}")
        if self.la_as_background:
            bad = [c for c in self.checks if c in LA_CHECKS]
            if bad:
                raise ValueError(f"checks {bad} need the LA label but la_as_background is set")

    @classmethod
    def camus(cls) -> "AnatomyConfig":
        """Painchaud et al. (TMI 2020) criteria for three-structure CAMUS masks (LV-bg frontier ratio <= 0.4)."""
        return cls()

    @classmethod
    def rl4seg(cls) -> "AnatomyConfig":
        """RL4Seg variant without the LA: LA relabelled background, LV-bg frontier ratio in [0.05, 1.5]."""
        return cls(
            checks=tuple(c for c in ALL_CHECKS if c not in LA_CHECKS),
            la_as_background=True,
            lv_bg_frontier_min=0.05,
            lv_bg_frontier_max=1.5,
        )


@dataclass
class CheckResult:
    """Outcome of one anatomical check.

    :param name: check name (see :data:`ALL_CHECKS`).
    :param value: measured value (pixels or a ratio); NaN when a needed structure is missing.
    :param threshold: inclusive valid range ``(min, max)``; ``None`` means unbounded on that side.
    :param passed: ``min <= value <= max`` and value is not NaN.
    """

    name: str
    value: float
    threshold: tuple[float | None, float | None]
    passed: bool


@dataclass
class AnatomyReport:
    """All checks of one mask and the overall verdict (``valid`` = every check passed)."""

    valid: bool
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        """Names of the checks that failed, in report order."""
        return [c.name for c in self.checks if not c.passed]

    def values(self) -> dict[str, float]:
        """``{check name: value}``."""
        return {c.name: c.value for c in self.checks}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"valid", "failed", "checks": {name: {"value", "threshold", "passed"}}}``
        (NaN values become None)."""
        return {
            "valid": bool(self.valid),
            "failed": self.failed,
            "checks": {
                c.name: {
                    "value": None if math.isnan(c.value) else float(c.value),
                    "threshold": list(c.threshold),
                    "passed": bool(c.passed),
                }
                for c in self.checks
            },
        }


class _Ctx:
    """Cropped label map and lazily computed quantities shared between checks."""

    def __init__(self, mask: np.ndarray, cfg: AnatomyConfig):
        self.shape = mask.shape
        self.small = mask.shape[0] * mask.shape[1] * cfg.gap_fraction
        lab = mask
        if cfg.la_as_background:
            lab = np.where(mask == 3, 0, mask)
        fg = (lab >= 1) & (lab <= 3)
        if fg.any():
            rows = np.flatnonzero(fg.any(axis=1))
            cols = np.flatnonzero(fg.any(axis=0))
            # one real pixel of margin (when the image has it): background next to the heart is real
            r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, lab.shape[0])
            c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, lab.shape[1])
            lab = lab[r0:r1, c0:c1]
        else:
            lab = lab[:1, :1]
        crop = np.full((lab.shape[0] + 2, lab.shape[1] + 2), _OUTSIDE, dtype=np.uint8)
        crop[1:-1, 1:-1] = np.where((lab >= 0) & (lab <= 3), lab, 0)
        self.lab = crop
        self.lv = crop == 1
        self.myo = crop == 2
        self.la = crop == 3
        self.bg = crop == 0
        self.present = {"LV": bool(self.lv.any()), "MYO": bool(self.myo.any()), "LA": bool(self.la.any())}

    def struct(self, name: str) -> np.ndarray:
        if name == "epi":
            return self.lv | self.myo
        return {"LV": self.lv, "MYO": self.myo, "LA": self.la}[name]


def _holes(m: np.ndarray) -> int:
    """Pixels of 8-connected regions of ``~m`` that do not touch the (outside) frame of the crop."""
    lab, n = ndimage.label(~m, structure=_EIGHT)
    if n <= 1:
        return 0
    return int(np.count_nonzero((lab != 0) & (lab != lab[0, 0])))


def _disconnected(m: np.ndarray) -> int:
    lab, n = ndimage.label(m, structure=_EIGHT)
    if n <= 1:
        return 0
    sizes = np.bincount(lab.ravel())[1:]
    return int(sizes.sum() - sizes.max())


def _enclosed(free: np.ndarray) -> np.ndarray:
    """Labelled 8-connected components of ``free`` that do not touch the frame (0 elsewhere)."""
    lab, n = ndimage.label(free, structure=_EIGHT)
    if n:
        lab[lab == lab[0, 0]] = 0
    return lab


def _gap(a: np.ndarray, b: np.ndarray) -> int:
    """Pixels enclosed by ``a ∪ b`` that are neither a hole of ``a`` alone nor of ``b`` alone."""
    union_holes = _enclosed(~(a | b)) > 0
    if not union_holes.any():
        return 0
    gap = union_holes
    for own, other in ((a, b), (b, a)):
        holes = _enclosed(~own)
        ids = np.unique(holes)
        if ids.size <= 1:
            continue
        containing = np.unique(holes[other])  # holes of `own` that hold the other structure stay gaps
        pure = np.isin(holes, np.setdiff1d(ids[ids != 0], containing))
        gap = gap & ~pure
    return int(np.count_nonzero(gap))


def frontier_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """Pixels of ``a`` 8-adjacent to ``b``, divided by the number of columns ``a`` spans (the frontier checks).

    :param a: (H, W) bool, non-empty.
    :param b: (H, W) bool.
    """
    cols = np.flatnonzero(a.any(axis=0))
    width = cols[-1] - cols[0] + 1
    touching = np.count_nonzero(a & ndimage.binary_dilation(b, _EIGHT))
    return touching / width


def _width_ratio(ctx: _Ctx) -> float:
    rows = np.nonzero(ctx.lv | ctx.myo)[0]
    r = int(rows.mean())
    w_lv = np.count_nonzero(ctx.lv[r])
    w_myo = np.count_nonzero(ctx.myo[r])
    return w_lv / w_myo if (w_lv and w_myo) else math.nan


def _erosion_ratio(ctx: _Ctx) -> float:
    lab, n0 = ndimage.label(ctx.myo, structure=_EIGHT)
    myo = ctx.myo
    if n0 > 1:  # measured on the largest piece: stray parts are disconnected_myo's business
        myo = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    thickness = float(ndimage.distance_transform_edt(myo).max())
    cheb = ndimage.distance_transform_cdt(myo, metric="chessboard")
    k = 0
    while True:
        k += 1
        lab, n = ndimage.label(cheb > k, structure=_EIGHT)
        if n:
            sizes = np.bincount(lab.ravel())[1:]
            n = int(np.count_nonzero(sizes >= ctx.small))
        if n != 1:
            return k / thickness


# name -> (structures needed, value function)
_CHECKS: dict[str, tuple[tuple[str, ...], Callable[[_Ctx], float]]] = {
    "holes_in_lv": (("LV",), lambda c: _holes(c.lv)),
    "holes_in_la": (("LA",), lambda c: _holes(c.la)),
    "holes_in_epi": (("LV", "MYO"), lambda c: _holes(c.lv | c.myo)),
    "disconnected_lv": (("LV",), lambda c: _disconnected(c.lv)),
    "disconnected_myo": (("MYO",), lambda c: _disconnected(c.myo)),
    "disconnected_la": (("LA",), lambda c: _disconnected(c.la)),
    "gap_lv_myo": (("LV", "MYO"), lambda c: _gap(c.lv, c.myo)),
    "gap_lv_la": (("LV", "LA"), lambda c: _gap(c.lv, c.la)),
    "frontier_lv_bg": (("LV",), lambda c: frontier_ratio(c.lv, c.bg)),
    "frontier_myo_la": (("MYO", "LA"), lambda c: frontier_ratio(c.myo, c.la)),
    "width_ratio_lv_myo": (("LV", "MYO"), _width_ratio),
    "erosion_ratio_myo": (("MYO",), _erosion_ratio),
}


def _thresholds(name: str, cfg: AnatomyConfig, small: float) -> tuple[float | None, float | None]:
    if name == "missing_structure":
        return (None, 0)
    if name.startswith("holes_in"):
        return (None, cfg.max_hole_pixels)
    if name.startswith("disconnected"):
        return (None, cfg.max_disconnected_pixels)
    if name.startswith("gap"):
        return (None, small)
    return {
        "frontier_lv_bg": (cfg.lv_bg_frontier_min, cfg.lv_bg_frontier_max),
        "frontier_myo_la": (None, cfg.myo_la_frontier_max),
        "width_ratio_lv_myo": (None, cfg.lv_myo_width_ratio_max),
        "erosion_ratio_myo": (cfg.myo_erosion_ratio_min, None),
    }[name]


def _passes(value: float, threshold: tuple[float | None, float | None]) -> bool:
    lo, hi = threshold
    if math.isnan(value):
        return False
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def check_anatomy(mask: np.ndarray, config: AnatomyConfig | None = None) -> AnatomyReport:
    """Run the configured anatomical checks on one label map.

    :param mask: (H, W) integer label map (0 bg, 1 LV, 2 MYO, 3 LA; other values count as background).
    :param config: checks and thresholds; default :meth:`AnatomyConfig.camus`.
    :return: an :class:`AnatomyReport` with one :class:`CheckResult` per enabled check, in
        :data:`ALL_CHECKS` order.
    """
    cfg = config if config is not None else AnatomyConfig.camus()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"check_anatomy expects a 2D label map, got shape {mask.shape}")
    if mask.dtype.kind not in "biu":
        if not np.all(np.mod(mask, 1) == 0):
            raise ValueError("check_anatomy expects integer labels")
        mask = mask.astype(np.int64)
    ctx = _Ctx(mask, cfg)
    required = ("LV", "MYO") if cfg.la_as_background else ("LV", "MYO", "LA")
    results = []
    for name in ALL_CHECKS:
        if name not in cfg.checks:
            continue
        thr = _thresholds(name, cfg, ctx.small)
        if name == "missing_structure":
            value = float(sum(not ctx.present[s] for s in required))
        else:
            needs, fn = _CHECKS[name]
            value = float(fn(ctx)) if all(ctx.present[s] for s in needs) else math.nan
        results.append(CheckResult(name, value, thr, _passes(value, thr)))
    return AnatomyReport(valid=all(r.passed for r in results), checks=results)


def is_valid(mask: np.ndarray, config: AnatomyConfig | None = None) -> bool:
    """``check_anatomy(mask, config).valid``."""
    return check_anatomy(mask, config).valid


def validity_rate(masks: Sequence[np.ndarray] | np.ndarray, config: AnatomyConfig | None = None) -> float:
    """Fraction of (H, W) label maps in ``masks`` that pass every check (NaN for none)."""
    return float(np.mean([is_valid(m, config) for m in masks])) if len(masks) else float("nan")
