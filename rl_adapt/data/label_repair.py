"""Repair of label maps that were resized by interpolating label values (e.g. ``Dataset501_CAMUS224``).

Interpolating the label *values* of a 0/1/2/3 map leaves one-pixel sandwiches whose label lies strictly
between its two opposite neighbours (1 between 0 and 2 along the outer myocardial border, 2 between 1 and 3
on the mitral plane, 2 between 0 and 3 along the atrium). :func:`remove_resize_artefacts` gives each such
pixel the most frequent other label among its 8 neighbours, then drops pixels outside each structure's
largest component. numpy/scipy only.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


def interpolation_artefacts(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose label is strictly between the labels of two opposite 8-neighbours."""
    m = np.pad(mask.astype(np.int16), 1, mode="edge")
    centre = m[1:-1, 1:-1]
    out = np.zeros(mask.shape, dtype=bool)
    h, w = mask.shape
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        p = m[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]
        q = m[1 - dr : 1 - dr + h, 1 - dc : 1 - dc + w]
        out |= (np.minimum(p, q) < centre) & (centre < np.maximum(p, q))
    return out


def remove_resize_artefacts(mask: np.ndarray) -> np.ndarray:
    """Undo label-interpolation artefacts of a resized label map (see the module docstring).

    :param mask: (H, W) integer label map (0..3).
    :return: (H, W) uint8 cleaned copy.
    """
    out = np.asarray(mask).astype(np.uint8).copy()
    bad = interpolation_artefacts(out)
    if bad.any():
        counts = np.stack([ndimage.convolve((out == k).astype(np.int16), _EIGHT.astype(np.int16),
                                            mode="constant") for k in range(4)])
        own = np.eye(4, dtype=bool)[out]  # (H, W, 4): the pixel's own label
        counts = np.where(np.moveaxis(own, -1, 0), -1, counts)
        out[bad] = np.argmax(counts, axis=0)[bad].astype(np.uint8)
    for k in (1, 2, 3):
        lab, n = ndimage.label(out == k, structure=_EIGHT)
        if n > 1:
            keep = np.argmax(np.bincount(lab.ravel())[1:]) + 1
            out[(lab > 0) & (lab != keep)] = 0
    return out
