"""Checks on images and label maps that turn bad input into one clear :class:`InputError`.

Every check names the offending file and says what is wrong, so the command line can print one line
and exit with status 2. The checks are pure functions on arrays; the readers call them right after
loading a file and the writers call them before anything is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from rl_adapt.errors import InputError

NUM_LABELS = 4
"""Label values allowed in a label map: 0 background, 1 LV, 2 MYO, 3 LA."""

SPACING_RTOL = 1e-3
"""Relative tolerance when comparing the spacing of an image and its label map."""

SPACING_RANGE: tuple[float, float] = (0.01, 10.0)
"""Plausible pixel spacing of a 2D echocardiogram, (lowest, highest) in mm per pixel, both included.

Scanners store B-mode images at about 0.1 to 1 mm per pixel (CAMUS: 0.15 to 0.3 mm); images resampled to
a small grid are coarser (a 180 mm sector on 32 rows is 5.6 mm per pixel) and data sets whose spacing was
lost say 1 x 1 (Dataset501_CAMUS224). Ten micrometres is finer than any cardiac probe resolves and 10 mm
leaves fewer than 20 pixels across a 180 mm sector, so values outside the range are header errors (a
forgotten unit, a default 0) that would make areas, volumes and resampling silently wrong, or make later
code allocate gigabytes (1000 mm) or divide by almost zero (1e-30 mm). Data that is truly outside the range
can be read by passing ``spacing_range`` to the readers; there is no environment variable for it.
"""


def check_exists(path: str | Path, what: str = "file") -> Path:
    """Raise :class:`InputError` when ``path`` does not exist; return it as a :class:`Path`."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"{what} not found")
    return path


def check_image_array(image: np.ndarray, path: str | Path | None) -> np.ndarray:
    """Check a 2D image: exactly two dimensions, non-empty, numeric, no NaN/Inf.

    :param image: (H, W) array of any real dtype.
    :returns: the same array.
    """
    if image.ndim != 2:
        raise InputError(path, f"expected a 2D image, got an array of shape {tuple(image.shape)}")
    if image.size == 0 or min(image.shape) < 2:
        raise InputError(path, f"image is empty or degenerate (shape {tuple(image.shape)})")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
            or image.dtype == bool):
        raise InputError(path, f"unsupported pixel type {image.dtype}")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        n_bad = int((~np.isfinite(image)).sum())
        raise InputError(path, f"image has {n_bad} NaN/Inf pixel(s)")
    return image


def check_label_array(label: np.ndarray, path: str | Path | None) -> np.ndarray:
    """Check a label map and return it as uint8.

    :param label: (H, W) array with integral values in 0..3 (any numeric dtype).
    :returns: (H, W) uint8 label map.
    """
    check_image_array(label, path)
    if np.issubdtype(label.dtype, np.floating):
        if not np.array_equal(label, np.round(label)):
            raise InputError(path, "label map has non-integer values (expected 0..3)")
    lo, hi = label.min(), label.max()
    if lo < 0 or hi >= NUM_LABELS:
        values = np.unique(label)
        bad = values[(values < 0) | (values >= NUM_LABELS)]
        shown = ", ".join(str(v.item()) for v in bad[:5])
        raise InputError(path, f"label values outside 0..{NUM_LABELS - 1}: {shown}")
    return label.astype(np.uint8, copy=False)


def check_pair(image_shape: Sequence[int], image_spacing: Sequence[float], label_shape: Sequence[int],
               label_spacing: Sequence[float], label_path: str | Path | None,
               image_path: str | Path | None = None) -> None:
    """Check that a label map matches its image in size (pixels) and spacing (mm, 1e-3 relative)."""
    if tuple(image_shape) != tuple(label_shape):
        raise InputError(label_path, f"label size {tuple(label_shape)} does not match image size "
                                     f"{tuple(image_shape)}" + (f" of {image_path}" if image_path else ""))
    if not np.allclose(image_spacing, label_spacing, rtol=SPACING_RTOL, atol=1e-6):
        fmt = lambda s: "x".join(f"{v:g}" for v in s)  # noqa: E731
        raise InputError(label_path, f"label spacing {fmt(label_spacing)} mm does not match image spacing "
                                     f"{fmt(image_spacing)} mm" + (f" of {image_path}" if image_path else ""))


def check_spacing_range(spacing_range: Sequence[float]) -> tuple[float, float]:
    """Check a ``(lowest, highest)`` spacing range in mm: ``0 < lowest <= highest`` (highest may be inf).

    :raises ValueError: a malformed range (a programming error, not bad input).
    """
    rng = tuple(float(v) for v in spacing_range)
    if len(rng) != 2 or not (np.isfinite(rng[0]) and 0 < rng[0] <= rng[1]):
        raise ValueError(f"spacing_range must be (lowest, highest) mm with 0 < lowest <= highest, got {spacing_range}")
    return rng  # type: ignore[return-value]


_FLOAT32_RTOL = 1e-6
"""Relative slack at the ends of a spacing range, for values that went through float32."""


def _fmt_spacing(values: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in values)


def check_spacing_values(values: Sequence[float], path: str | Path | None,
                         spacing_range: Sequence[float] = SPACING_RANGE, what: str = "pixel spacing") -> None:
    """Check that every value of a spacing is finite and inside ``spacing_range``.

    :param values: spacing in mm, any number of axes (e.g. from a file header, before the image is read).
    :param spacing_range: (lowest, highest) mm, both included (with float32 rounding); see :data:`SPACING_RANGE`.
    :param what: how the message names the values (e.g. "header pixel spacing (row x col)").
    :raises InputError: naming ``path``, the values and the allowed range.
    """
    lo, hi = check_spacing_range(spacing_range)
    vals = [float(v) for v in values]
    slack = 1 + _FLOAT32_RTOL  # headers store float32: 0.01 comes back as 0.0099999998
    if all(np.isfinite(v) and lo / slack <= v <= hi * slack for v in vals):
        return
    raise InputError(path, f"{what} {_fmt_spacing(vals)} mm is outside the plausible range for 2D echocardiography "
                           f"(each value must be a finite number from {lo:g} to {hi:g} mm)")


def check_spacing(spacing: Sequence[float], path: str | Path | None,
                  spacing_range: Sequence[float] = SPACING_RANGE) -> tuple[float, float]:
    """Check a (row, col) spacing in mm: two finite numbers inside ``spacing_range``.

    :param spacing: (row, col) pixel size in mm.
    :param spacing_range: (lowest, highest) mm, both included; defaults to :data:`SPACING_RANGE`.
    :returns: the spacing as a tuple of two floats.
    :raises InputError: naming ``path``, the value and the allowed range.
    """
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 2:
        raise InputError(path, f"invalid pixel spacing {tuple(spacing)} (expected two numbers in mm: row, col)")
    check_spacing_values(sp, path, spacing_range)
    return sp  # type: ignore[return-value]


def check_not_empty(items: Iterable, path: str | Path, what: str = "images") -> list:
    """Raise :class:`InputError` when a folder yielded nothing; return the items as a list."""
    items = list(items)
    if not items:
        raise InputError(path, f"no {what} found")
    return items


def check_case(case, spacing_range: Sequence[float] = SPACING_RANGE) -> None:
    """Check a :class:`~rl_adapt.data.case.Case` before writing it (image, label, spacing, shapes)."""
    where = case.source or case.name
    check_image_array(case.image, where)
    check_spacing(case.spacing, where, spacing_range)
    if case.label is not None:
        check_label_array(case.label, where)
        if case.label.shape != case.image.shape:
            raise InputError(where, f"label size {case.label.shape} does not match image size {case.image.shape}")
