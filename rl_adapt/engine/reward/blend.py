"""The per-pixel reward PPO optimises: the reward network's score, blended with agreement with the trusted
corrections, minus the anatomical contact penalties.

For pixel p of a sampled label map a on target image i::

    r = w_i * 1[a_p == corrected_i,p] + (1 - w_i) * reward_net(image_i, a)_p
        - myo_la_penalty * 1[p is MYO touching LA or LA touching MYO] - lv_bg_penalty * 1[p is LV touching background]

with ``w_i = correction_reward_weight`` where image i's correction is trusted and 0 elsewhere (RL4Seg: w = 0, the
pure learned reward). :class:`BlendedReward` is the environment's reward function: it is called with the images,
the actions and the indices of the images in the target set, and needs nothing else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rl_adapt.engine.reward.network import RewardNet
from rl_adapt.labels import BG, LA, LV, MYO


def touching(labels: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """(B, H, W) bool: pixels of label ``a`` with a pixel of label ``b`` in their 8-neighbourhood (the image's
    outside counts as neither), as the anatomy module's frontier checks count them.

    :param labels: (B, H, W) integer label maps.
    """
    near_b = F.max_pool2d((labels == b).float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
    return (labels == a) & near_b


class BlendedReward:
    """The per-pixel PPO reward (see the module docstring).

    :param reward_net: the reward network (its :meth:`~RewardNet.score` is the learned reward), or anything with a
        ``score(images, actions)`` method.
    :param corrected: (N, H, W) int64 corrected masks of the N target images, on the device.
    :param trusted: (N,) bool, images whose correction is trusted.
    :param weight: w in [0, 1].
    :param myo_la_penalty: subtracted at MYO/LA contact pixels (0: off).
    :param lv_bg_penalty: subtracted at LV/background contact pixels (0: off).
    """

    def __init__(self, reward_net: RewardNet, corrected: torch.Tensor, trusted: torch.Tensor, weight: float,
                 myo_la_penalty: float = 0.0, lv_bg_penalty: float = 0.0):
        self.reward_net = reward_net
        self.corrected = corrected
        self.trusted = trusted
        self.weight = float(weight)
        self.myo_la_penalty = float(myo_la_penalty)
        self.lv_bg_penalty = float(lv_bg_penalty)

    def __call__(self, images: torch.Tensor, actions: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) images, (B, H, W) int64 labels and the (B,) indices of the images in the target set ->
        (B, H, W) reward (in [0, 1] without the penalties)."""
        learned = self.reward_net.score(images, actions)
        if self.weight <= 0:
            out = learned
        else:
            idx = indices.to(self.corrected.device)
            w = self.weight * self.trusted[idx].to(learned.dtype)[:, None, None]
            agree = (actions == self.corrected[idx]).to(learned.dtype)
            out = w * agree + (1 - w) * learned
        if self.myo_la_penalty > 0:
            out = out - self.myo_la_penalty * ((touching(actions, MYO, LA) | touching(actions, LA, MYO)).to(out.dtype))
        if self.lv_bg_penalty > 0:
            out = out - self.lv_bg_penalty * touching(actions, LV, BG).to(out.dtype)
        return out
