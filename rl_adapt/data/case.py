"""The :class:`Case`: one 2D echocardiographic image, its optional label map, spacing and metadata."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

LABELS: dict[int, str] = {0: "background", 1: "LV", 2: "MYO", 3: "LA"}
"""CAMUS label values: 0 background, 1 left-ventricle cavity, 2 myocardium, 3 left atrium."""

LABEL_ALIASES: dict[int, tuple[str, ...]] = {
    0: ("background", "bg", "bkg", "bck"),
    1: ("LV", "left ventricle", "left ventricular cavity", "left ventricle cavity", "LV cavity", "LV blood pool",
        "LV endo", "LV endocardium", "endocardium", "LV lumen"),
    2: ("MYO", "myocardium", "LV myocardium", "LV myo", "LV wall", "myocardial wall", "epicardium", "LV epi",
        "LV epicardium"),
    3: ("LA", "left atrium", "left atrial cavity", "LA cavity", "atrium"),
}
"""Class names other label files use for the :data:`LABELS` classes, matched ignoring case, spaces, ``_`` and
``-``. CAMUS itself calls 1 "LV endocardium" (the cavity inside the endocardial contour) and 2 "LV
epicardium" (the ring between the endocardial and epicardial contours, i.e. the myocardium)."""


@dataclass
class Case:
    """One 2D image (apex up, rows = depth) with optional labels.

    :param name: unique case id, e.g. ``patient0001_2CH_ED``.
    :param image: (H, W) float32 or uint8 B-mode intensities.
    :param label: optional (H, W) uint8 label map with values in {0, 1, 2, 3} (see :data:`LABELS`).
    :param spacing: pixel size in mm as (row, col).
    :param meta: patient, view ("2CH"/"4CH"), phase ("ED"/"ES"), quality, EF (%), EDV/ESV (ml) ...
    :param source: the file the image was read from, if any (used in error messages).
    """

    name: str
    image: np.ndarray
    label: np.ndarray | None = None
    spacing: tuple[float, float] = (1.0, 1.0)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    @property
    def patient(self) -> str | None:
        """Patient id from ``meta`` (None when unknown)."""
        return self.meta.get("patient")

    @property
    def view(self) -> str | None:
        """"2CH" / "4CH" or None."""
        return self.meta.get("view")

    @property
    def phase(self) -> str | None:
        """"ED" / "ES" or None."""
        return self.meta.get("phase")

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return tuple(self.image.shape[:2])  # type: ignore[return-value]
