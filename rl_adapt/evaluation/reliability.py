"""The reward network as an uncertainty map, scored against the true labels: reliability bins, ECE and AUROC of
``1 - reward`` as a detector of wrong pixels, in the image geometry."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from rl_adapt.measures.calibration import auroc, reliability_bins


def reward_in_geometry(reward_net, model, case) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The reward of ``model``'s own argmax action, as the reward network sees it during adaptation, beside the
    model's own softmax confidence in that action.

    The network and the reward network run on :meth:`to_patch` (nnU-Net preprocessing, fixed patch); the
    action, the reward map and the confidence are then mapped back to the case's geometry with :meth:`from_patch`
    (reward and confidence ride as channels of a logit stack, linearly resampled; one channel marks the pixels the
    patch covers).

    :returns: ``(reward (H, W) float32 in [0, 1], prediction (H, W) uint8, covered (H, W) bool, confidence (H, W)
        float32 in [0, 1])``; the confidence is the maximum softmax probability of the network per pixel.
    """
    patch, props = model.to_patch(case.image, case.spacing)
    with torch.no_grad():
        out = model.network(patch[None].to(model.device))
        out = out[0] if isinstance(out, (list, tuple)) else out
        action = out.argmax(1)
        r = reward_net.score(patch[None].float(), action)[0].float().cpu().numpy()
        confidence = torch.softmax(out.float(), 1).amax(1)[0].cpu().numpy()
    action = action[0].cpu().numpy()
    stack = np.zeros((max(3, model.num_classes),) + r.shape, dtype=np.float32)
    stack[0] = r
    stack[1] = 1.0  # 1 inside the patch; from_patch fills outside it with a very negative logit
    stack[2] = confidence
    back = model.from_patch(stack, props)
    pred = np.asarray(model.from_patch(action, props), dtype=np.uint8)
    return (np.clip(back[0], 0.0, 1.0).astype(np.float32), pred, back[1] > 0.5,
            np.clip(back[2], 0.0, 1.0).astype(np.float32))


BORDER_PX = 5
"""Width of the band around a predicted or true border where :func:`reward_reliability` also scores the reward
(where the errors are: over all pixels the easy background dominates the AUROC)."""


def label_edges(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of a label map ``mask`` (H, W) with a 4-neighbour of another label (both sides of
    every border)."""
    m = np.asarray(mask)
    edges = np.zeros(m.shape, bool)
    edges[:-1] |= m[:-1] != m[1:]
    edges[1:] |= m[:-1] != m[1:]
    edges[:, :-1] |= m[:, :-1] != m[:, 1:]
    edges[:, 1:] |= m[:, :-1] != m[:, 1:]
    return edges


def border_band(pred: np.ndarray, truth: np.ndarray, width: int = BORDER_PX) -> np.ndarray:
    """(H, W) bool: pixels within ``width`` pixels (Euclidean) of a label border of ``pred`` or of ``truth``."""
    edges = label_edges(pred) | label_edges(truth)
    if not edges.any():
        return edges
    return ndimage.distance_transform_edt(~edges) <= width


class _Reliability:
    """Reliability bins (exact) and a seeded pixel subsample for the AUROC, accumulated over images."""

    def __init__(self, n_bins: int, per_image: int, rng: np.random.Generator) -> None:
        self.n_bins, self.per_image, self.rng = n_bins, per_image, rng
        self.count = np.zeros(n_bins, dtype=np.int64)
        self.sum_p = np.zeros(n_bins)
        self.sum_y = np.zeros(n_bins)
        self.keep_p: list[np.ndarray] = []
        self.keep_y: list[np.ndarray] = []

    def add(self, p: np.ndarray, y: np.ndarray) -> None:
        """Pixels' reward ``p`` (P(right)) and whether they are right ``y`` (1-D, same length)."""
        b = reliability_bins(p, y, self.n_bins)
        self.count += b.counts
        self.sum_p += np.nan_to_num(b.confidence) * b.counts
        self.sum_y += np.nan_to_num(b.accuracy) * b.counts
        if p.size:
            sel = self.rng.choice(p.size, size=min(self.per_image, p.size), replace=False)
            self.keep_p.append(p[sel])
            self.keep_y.append(y[sel])

    def result(self) -> dict:
        total = int(self.count.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = np.where(self.count > 0, self.sum_p / np.maximum(self.count, 1), np.nan)
            acc = np.where(self.count > 0, self.sum_y / np.maximum(self.count, 1), np.nan)
        ece = float(np.nansum(self.count / max(total, 1) * np.abs(acc - conf))) if total else float("nan")
        ap = np.concatenate(self.keep_p) if self.keep_p else np.zeros(0)
        ay = np.concatenate(self.keep_y) if self.keep_y else np.zeros(0, bool)
        return {"ece": ece, "auroc": auroc(1.0 - ap, ~ay) if ap.size else float("nan"), "n_pixels": total,
                "error_rate": float(1.0 - self.sum_y.sum() / total) if total else float("nan"),
                "bins": {"edges": np.linspace(0.0, 1.0, self.n_bins + 1).tolist(), "confidence": conf.tolist(),
                         "accuracy": acc.tolist(), "count": self.count.tolist()}}


def reward_reliability(reward_net, model, cases: Sequence, n_bins: int = 10, max_auroc_pixels: int = 2_000_000,
                       seed: int = 0, progress: bool = True, border_px: int = BORDER_PX) -> dict:
    """Per-pixel reliability of ``reward_net`` on ``model``'s argmax predictions vs ground-truth correctness.

    The reward network scores the network's argmax action on the patch (:func:`reward_in_geometry`); reward
    and action are mapped back to the image geometry and compared with the ground truth there, over the
    pixels the patch covers, and again over those within ``border_px`` pixels of a predicted or true border
    (:func:`border_band`). ECE and the reliability bins are exact; the AUROC of ``1 - reward`` as a detector of
    wrong pixels uses a seeded subsample. The model's own softmax confidence is scored the same way on the same
    pixels, as the reference a reward must beat to know more about the masks than the policy does.

    :returns: ``{"ece", "auroc", "n_pixels", "error_rate", "bins": {"edges", "confidence", "accuracy", "count"},
        "border": {the same keys for the band}, "border_px", "policy_confidence": {"everywhere": {the same keys},
        "border": {the same keys}}}`` (lists; NaN where a bin is empty).
    """
    per_image = max(1, max_auroc_pixels // max(1, len(cases)))
    scored = {(what, where): _Reliability(n_bins, per_image, np.random.default_rng(seed + (where == "border")))
              for what in ("reward", "confidence") for where in ("everywhere", "border")}
    for c in tqdm(cases, desc="reward", unit="img", disable=None if progress else True):
        r, pred, covered, confidence = reward_in_geometry(reward_net, model, c)
        right = pred == c.label
        band = covered & border_band(pred, c.label, border_px)
        for where, keep in (("everywhere", covered), ("border", band)):
            scored["reward", where].add(r[keep], right[keep])
            scored["confidence", where].add(confidence[keep], right[keep])
    out = {k[1]: v.result() for k, v in scored.items() if k[0] == "confidence"}
    return {**scored["reward", "everywhere"].result(), "border": scored["reward", "border"].result(),
            "border_px": int(border_px), "policy_confidence": out}


def uncertainty_map(reward_net, model, case) -> np.ndarray:
    """``1 - reward`` of ``model``'s argmax prediction in the case's geometry: (H, W) float32, 0 outside the patch."""
    r, _, covered, _ = reward_in_geometry(reward_net, model, case)
    return np.where(covered, 1.0 - r, 0.0).astype(np.float32)
