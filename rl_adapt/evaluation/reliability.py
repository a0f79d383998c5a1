"""The reward network as an uncertainty map, scored against the true labels: reliability bins, ECE and AUROC of
``1 - reward`` as a detector of wrong pixels, in the image geometry."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from rl_adapt.measures.calibration import auroc, reliability_bins

def reward_in_geometry(reward_net, model, case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reward of ``model``'s own argmax action, as the reward network sees it during adaptation.

    The network and the reward network run on :meth:`to_patch` (nnU-Net preprocessing, fixed patch); the
    action and the reward map are then mapped back to the case's geometry with :meth:`from_patch` (the
    reward rides as channel 0 of a logit stack, linearly resampled; channel 1 marks the pixels the patch
    covers).

    :returns: ``(reward (H, W) float32 in [0, 1], prediction (H, W) uint8, covered (H, W) bool)``.
    """

    patch, props = model.to_patch(case.image, case.spacing)
    with torch.no_grad():
        out = model.network(patch[None].to(model.device))
        out = out[0] if isinstance(out, (list, tuple)) else out
        action = out.argmax(1)
        r = reward_net.score(patch[None].float(), action)[0].float().cpu().numpy()
    action = action[0].cpu().numpy()
    stack = np.zeros((model.num_classes,) + r.shape, dtype=np.float32)
    stack[0] = r
    stack[1] = 1.0  # 1 inside the patch; from_patch fills outside it with a very negative logit
    back = model.from_patch(stack, props)
    pred = np.asarray(model.from_patch(action, props), dtype=np.uint8)
    return np.clip(back[0], 0.0, 1.0).astype(np.float32), pred, back[1] > 0.5


def reward_reliability(reward_net, model, cases: Sequence, n_bins: int = 10, max_auroc_pixels: int = 2_000_000,
                       seed: int = 0, progress: bool = True) -> dict:
    """Per-pixel reliability of ``reward_net`` on ``model``'s argmax predictions vs ground-truth correctness.

    The reward network scores the network's argmax action on the patch (:func:`reward_in_geometry`); reward
    and action are mapped back to the image geometry and compared with the ground truth there, over the
    pixels the patch covers. ECE and the reliability bins are exact over all those pixels; the AUROC of
    ``1 - reward`` as a detector of wrong pixels uses a seeded subsample.

    :returns: ``{"ece", "auroc", "n_pixels", "error_rate", "bins": {"edges", "confidence", "accuracy",
        "count"}}`` (lists; NaN where a bin is empty).
    """


    edges = np.linspace(0.0, 1.0, n_bins + 1)
    count = np.zeros(n_bins, dtype=np.int64)
    sum_p = np.zeros(n_bins)
    sum_y = np.zeros(n_bins)
    keep_p, keep_y = [], []
    per_case = max(1, max_auroc_pixels // max(1, len(cases)))
    rng = np.random.default_rng(seed)
    for c in tqdm(cases, desc="reward", unit="img", disable=None if progress else True):
        r, pred, covered = reward_in_geometry(reward_net, model, c)
        p, y = r[covered], (pred == c.label)[covered]
        b = reliability_bins(p, y, n_bins)
        count += b.counts
        sum_p += np.nan_to_num(b.confidence) * b.counts
        sum_y += np.nan_to_num(b.accuracy) * b.counts
        if p.size:
            sel = rng.choice(p.size, size=min(per_case, p.size), replace=False)
            keep_p.append(p[sel])
            keep_y.append(y[sel])
    total = int(count.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, sum_p / np.maximum(count, 1), np.nan)
        acc = np.where(count > 0, sum_y / np.maximum(count, 1), np.nan)
    ece = float(np.nansum(count / max(total, 1) * np.abs(acc - conf))) if total else float("nan")
    ap = np.concatenate(keep_p) if keep_p else np.zeros(0)
    ay = np.concatenate(keep_y) if keep_y else np.zeros(0, bool)
    return {"ece": ece, "auroc": auroc(1.0 - ap, ~ay) if ap.size else float("nan"), "n_pixels": total,
            "error_rate": float(1.0 - sum_y.sum() / total) if total else float("nan"),
            "bins": {"edges": edges.tolist(), "confidence": conf.tolist(), "accuracy": acc.tolist(),
                     "count": count.tolist()}}


def uncertainty_map(reward_net, model, case) -> np.ndarray:
    """``1 - reward`` of ``model``'s argmax prediction in the case's geometry: (H, W) float32, 0 outside the patch."""
    r, _, covered = reward_in_geometry(reward_net, model, case)
    return np.where(covered, 1.0 - r, 0.0).astype(np.float32)
