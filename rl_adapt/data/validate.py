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


def check_spacing(spacing: Sequence[float], path: str | Path | None) -> tuple[float, float]:
    """Check a (row, col) spacing in mm: two finite positive numbers."""
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 2 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise InputError(path, f"invalid pixel spacing {spacing} (expected two positive numbers in mm)")
    return sp  # type: ignore[return-value]


def check_not_empty(items: Iterable, path: str | Path, what: str = "images") -> list:
    """Raise :class:`InputError` when a folder yielded nothing; return the items as a list."""
    items = list(items)
    if not items:
        raise InputError(path, f"no {what} found")
    return items


def check_case(case) -> None:
    """Check a :class:`~rl_adapt.data.case.Case` before writing it (image, label, spacing, shapes)."""
    where = case.source or case.name
    check_image_array(case.image, where)
    check_spacing(case.spacing, where)
    if case.label is not None:
        check_label_array(case.label, where)
        if case.label.shape != case.image.shape:
            raise InputError(where, f"label size {case.label.shape} does not match image size {case.image.shape}")
