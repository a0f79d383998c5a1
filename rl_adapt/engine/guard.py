"""The label-free guard against reward hacking (``AdaptConfig.keep_if_closer``): a PPO phase's weights are kept only
if the policy's argmax agrees better with that iteration's corrections than before the phase."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rl_adapt.measures.metrics import mean_dice


def agreement(masks: np.ndarray, corrected: np.ndarray) -> float:
    """Mean over images of the mean Dice (LV, MYO, LA) between (N, H, W) ``masks`` and ``corrected``."""
    return float(np.mean([mean_dice(a, b) for a, b in zip(masks, corrected)]))


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
    """The phase moved the policy away from the corrections (and the guard is on)."""


def judge(before: np.ndarray, after: np.ndarray, corrected: np.ndarray, judged: np.ndarray,
          enabled: bool) -> GuardVerdict:
    """Judge a PPO phase on the images ``judged`` (indices) by agreement with ``corrected``.

    :param before: (N, H, W) uint8 argmax of the policy before the phase; ``after`` the same after it.
    :param corrected: (N, H, W) uint8 corrections of the iteration.
    :param enabled: the guard is on (otherwise nothing is rejected; the figures are still measured).
    """
    a0 = agreement(before[judged], corrected[judged])
    a1 = agreement(after[judged], corrected[judged])
    return GuardVerdict(agreement_before=a0, agreement_after=a1, n_images=int(len(judged)),
                        rejected=bool(enabled and a1 < a0))
