"""The label-free guard against reward hacking (``AdaptConfig.keep_if_closer``): a PPO phase's weights are kept only
if the policy's argmax agrees better with that iteration's corrections than before the phase."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rl_adapt.measures.metrics import mean_dice


def agreement(masks: np.ndarray, corrected: np.ndarray) -> float:
    """Mean over images of the mean Dice (LV, MYO, LA) between (N, H, W) ``masks`` and ``corrected``."""
    return float(np.mean(_dices(masks, corrected)))


def _dices(masks: np.ndarray, corrected: np.ndarray) -> np.ndarray:
    return np.array([mean_dice(a, b) for a, b in zip(masks, corrected)], dtype=np.float64)


@dataclass
class GuardVerdict:
    """What the guard measured on the judged images and whether it rejects the phase."""

    agreement_before: float
    """Agreement of the argmax before the phase with the corrections."""
    agreement_after: float
    """Agreement of the argmax after the phase with the corrections."""
    n_images: int
    """Images judged."""
    rejected: bool
    """The phase moved the policy away from the corrections by more than the tolerance (and the guard is on)."""
    change_se: float = 0.0
    """Standard error of the mean paired per-image change of agreement (0 for fewer than 2 images)."""


def judge(before: np.ndarray, after: np.ndarray, corrected: np.ndarray, judged: np.ndarray,
          enabled: bool, tolerance_se: float = 0.0) -> GuardVerdict:
    """Judge a PPO phase on the images ``judged`` (indices) by agreement with ``corrected``.

    :param before: (N, H, W) uint8 argmax of the policy before the phase; ``after`` the same after it.
    :param corrected: (N, H, W) uint8 corrections of the iteration.
    :param enabled: the guard is on (otherwise nothing is rejected; the figures are still measured).
    :param tolerance_se: reject only a fall of the mean agreement larger than this many standard errors of the
        mean paired per-image change (0: any fall): a fall within the judged images' noise is not evidence.
    """
    d0 = _dices(before[judged], corrected[judged])
    d1 = _dices(after[judged], corrected[judged])
    a0, a1 = float(d0.mean()), float(d1.mean())
    se = float((d1 - d0).std(ddof=1) / np.sqrt(len(d0))) if len(d0) > 1 else 0.0
    return GuardVerdict(agreement_before=a0, agreement_after=a1, n_images=int(len(judged)),
                        rejected=bool(enabled and a1 < a0 - float(tolerance_se) * se), change_se=se)
