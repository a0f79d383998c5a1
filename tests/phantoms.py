"""Label-map phantoms shared by the corrector, shape-prior and reward-network tests."""
from __future__ import annotations

import numpy as np

BG, LV, MYO, LA = 0, 1, 2, 3


def heart(size: int, rng: np.random.Generator, jitter: tuple[float, float] = (1.5, 2.0)) -> np.ndarray:
    """Apex-up synthetic heart: LV ellipse cut at the base, MYO wall open at the base, LA below the mitral plane.

    :param size: side of the (size, size) uint8 label map.
    :param jitter: standard deviations (in 64-px units) of the centre's row and column.
    """
    s = size / 64
    cy, cx = 28 * s + rng.normal(0, jitter[0] * s), 32 * s + rng.normal(0, jitter[1] * s)
    ry, rx, t = (15 + rng.normal(0, 1.5)) * s, (9 + rng.normal(0, 1)) * s, (4 + rng.normal(0, 0.4)) * s
    base = int(round(cy + 0.75 * ry))
    yy, xx = np.mgrid[:size, :size]
    lv = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & (yy <= base)
    epi = (((yy - cy) / (ry + t)) ** 2 + ((xx - cx) / (rx + t)) ** 2 <= 1) & (yy <= base)
    cols = np.flatnonzero(lv[base])
    hw, ccx = (cols[-1] - cols[0] + 1) / 2, (cols[0] + cols[-1]) / 2
    lar = (9 + rng.normal(0, 1)) * s
    la = (((yy - (base + 0.5)) / lar) ** 2 + ((xx - ccx) / (hw + 0.01)) ** 2 <= 1) & (yy > base)
    m = np.zeros((size, size), np.uint8)
    m[epi], m[lv], m[la] = MYO, LV, LA
    return m
