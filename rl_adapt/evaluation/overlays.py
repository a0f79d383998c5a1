"""The cases the report shows (helped most, hurt most, random) and their thumbnails (``overlays.npz``)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from rl_adapt.evaluation.reliability import uncertainty_map
from rl_adapt.measures.statistics import as_float

def thumb_index(shape: Sequence[int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour row/col indices that shrink ``shape`` to at most ``size`` pixels on its long side."""
    h, w = int(shape[0]), int(shape[1])
    f = min(1.0, size / max(h, w))
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    return (np.minimum((np.arange(nh) + 0.5) * h / nh, h - 1).astype(np.intp),
            np.minimum((np.arange(nw) + 0.5) * w / nw, w - 1).astype(np.intp))


def image_to_uint8(image: np.ndarray) -> np.ndarray:
    """Display version of an image: (H, W) uint8 stretched between its 1st and 99th percentiles."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, (1, 99)) if img.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def select_overlays(image_rows: Sequence[Mapping], cases: Sequence[str], models: Sequence[str], n: int,
                    seed: int = 0) -> list[tuple[str, str]]:
    """Cases shown in the report: ``[(case, group)]``.

    With two or more models: the ``n`` cases with the largest and the ``n`` with the smallest paired
    difference of mean Dice (last model minus first) as "helped"/"hurt", then ``n`` random others;
    with one model: the ``n`` lowest mean Dice ("worst") and ``n`` random others.
    """
    if n <= 0 or not cases:
        return []
    dice = {(r["model"], r["case"]): as_float(r.get("mean_dice")) for r in image_rows}
    first, last = models[0], models[-1]
    chosen: list[tuple[str, str]] = []
    if len(models) > 1:
        diffs = [(dice.get((last, c), np.nan) - dice.get((first, c), np.nan), c) for c in cases]
        diffs = [(d, c) for d, c in diffs if math.isfinite(d)]
        diffs.sort(key=lambda t: (-t[0], t[1]))
        chosen += [(c, "helped") for d, c in diffs[:n] if d > 0]
        taken = {c for c, _ in chosen}
        chosen += [(c, "hurt") for d, c in reversed(diffs) if d < 0 and c not in taken][:n]
    else:
        order = sorted(((dice.get((first, c), np.nan), c) for c in cases), key=lambda t: (t[0] if math.isfinite(t[0]) else -1, t[1]))
        chosen += [(c, "worst") for _, c in order[:n]]
    taken = {c for c, _ in chosen}
    rest = [c for c in cases if c not in taken]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(rest), size=min(n, len(rest)), replace=False) if rest else []
    chosen += [(rest[i], "random") for i in sorted(pick)]
    return chosen


def overlay_arrays(chosen: Sequence[tuple[str, str]], cases: Sequence, preds: Mapping[str, Sequence[np.ndarray]],
                    image_rows: Sequence[Mapping], names: Sequence[str], size: int, reward_net=None,
                    first_model=None) -> dict | None:
    """Arrays of ``overlays.npz``: thumbnails padded to a common (h, w) with their true ``shape``."""
    if not chosen:
        return None
    index = {c.name: i for i, c in enumerate(cases)}
    dice = {(r["model"], r["case"]): as_float(r.get("mean_dice")) for r in image_rows}
    thumbs = []
    for name, _ in chosen:
        c = cases[index[name]]
        ri, ci = thumb_index(c.image.shape[:2], size)
        t = {"image": image_to_uint8(c.image)[np.ix_(ri, ci)], "gt": c.label[np.ix_(ri, ci)],
             "pred": [preds[n][index[name]][np.ix_(ri, ci)] for n in names]}
        if reward_net is not None:
            t["unc"] = uncertainty_map(reward_net, first_model, c)[np.ix_(ri, ci)]
        thumbs.append(t)
    h = max(t["image"].shape[0] for t in thumbs)
    w = max(t["image"].shape[1] for t in thumbs)

    def pad(a: np.ndarray, dtype) -> np.ndarray:
        o = np.zeros((h, w), dtype=dtype)
        o[: a.shape[0], : a.shape[1]] = a
        return o

    out = {
        "case": np.array([n for n, _ in chosen]),
        "group": np.array([g for _, g in chosen]),
        "models": np.array(list(names)),
        "shape": np.array([t["image"].shape for t in thumbs], dtype=np.int32),
        "image": np.stack([pad(t["image"], np.uint8) for t in thumbs]),
        "gt": np.stack([pad(t["gt"], np.uint8) for t in thumbs]),
        "pred": np.stack([np.stack([pad(t["pred"][j], np.uint8) for t in thumbs]) for j in range(len(names))]),
        "dice": np.array([[dice.get((n, c), np.nan) for c, _ in chosen] for n in names], dtype=np.float64),
    }
    if reward_net is not None:
        out["uncertainty"] = np.stack([pad(t["unc"], np.float16) for t in thumbs])
    return out
