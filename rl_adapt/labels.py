"""The label values of a segmentation, defined once: 0 background, 1 LV cavity, 2 myocardium, 3 left atrium
(CAMUS; the epicardium is LV | MYO)."""
from __future__ import annotations

BG, LV, MYO, LA = 0, 1, 2, 3
"""Label values."""

NUM_LABELS = 4
"""Number of label values (0..3)."""

STRUCTURES: tuple[int, ...] = (LV, MYO, LA)
"""Label values of the three scored structures."""

STRUCTURE_NAMES: dict[str, int] = {"LV": LV, "MYO": MYO, "LA": LA}
"""Structure name -> label value."""

LABEL_NAMES: dict[int, str] = {BG: "background", LV: "LV", MYO: "MYO", LA: "LA"}
"""Label value -> name, as nnU-Net's ``dataset.json`` names them."""

NNUNET_LABELS: dict[str, int] = {name: value for value, name in LABEL_NAMES.items()}
"""The ``labels`` entry of an nnU-Net ``dataset.json``: {"background": 0, "LV": 1, "MYO": 2, "LA": 3}."""
