"""A vectorised per-pixel categorical distribution (one independent categorical per pixel).

stable-baselines3's ``MultiCategoricalDistribution`` builds one ``torch.distributions.Categorical`` per
action dimension, i.e. per pixel: seconds per 256x256 image. This class does the same maths on the whole
logit map at once (log-softmax once, gather, Gumbel-max sampling): milliseconds.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduce = Literal["none", "sum", "mean"]


def _reduce(values: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    """Reduce a per-pixel map (B,H,W) to (B,) by "sum" or "mean"; "none" returns it unchanged."""
    if reduce == "none":
        return values
    if reduce == "sum":
        return values.sum(dim=(1, 2))
    if reduce == "mean":
        return values.mean(dim=(1, 2))
    raise ValueError(f"reduce must be 'none', 'sum' or 'mean', got {reduce!r}")


class PixelCategorical:
    """Independent categorical distributions over K classes at every pixel.

    :param logits: unnormalised log-probabilities, float tensor (B, K, H, W). Computed in float32 when given
        in a lower precision (bf16 autocast outputs): log-probabilities of sampled actions feed PPO ratios.
    """

    def __init__(self, logits: torch.Tensor):
        if logits.dim() != 4:
            raise ValueError(f"logits must be (B, K, H, W), got shape {tuple(logits.shape)}")
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        #: per-pixel log-probabilities, (B, K, H, W) float
        self.log_probs = F.log_softmax(logits, dim=1)
        self._probs: torch.Tensor | None = None

    @property
    def probs(self) -> torch.Tensor:
        """Per-pixel class probabilities, (B, K, H, W) float (computed once, on first use)."""
        if self._probs is None:
            self._probs = self.log_probs.exp()
        return self._probs

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return int(self.log_probs.shape[1])

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw one label per pixel by the Gumbel-max trick.

        ``argmax_k(log p_k + G_k)`` with ``G_k = -log E_k``, ``E_k ~ Exp(1)``, which equals
        ``argmax_k(p_k / E_k)`` (no logarithm needed).

        :param generator: optional torch generator on the logits' device (seeded sampling).
        :param noise: the ``Exp(1)`` draws themselves, (B, K, H, W) (e.g. seeded per image); overrides ``generator``.
        :return: actions, (B, H, W) int64.
        """
        with torch.no_grad():
            if noise is None:
                noise = torch.empty_like(self.log_probs).exponential_(generator=generator)
            return torch.argmax(self.probs / noise, dim=1)

    def mode(self) -> torch.Tensor:
        """The most probable label per pixel, (B, H, W) int64."""
        return torch.argmax(self.log_probs, dim=1)

    def get_actions(self, deterministic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mode()`` when deterministic else ``sample()`` (SB3's Distribution method name); (B, H, W) int64."""
        return self.mode() if deterministic else self.sample(generator)

    def log_prob(self, actions: torch.Tensor, reduce: Reduce = "none") -> torch.Tensor:
        """Log-probability of given labels.

        :param actions: labels, (B, H, W) integer tensor (any integer dtype; cast to int64).
        :param reduce: "none" -> per-pixel map (B, H, W); "sum" -> joint log-prob per image (B,); "mean" -> (B,).
        """
        if actions.dim() != 3:
            raise ValueError(f"actions must be (B, H, W), got shape {tuple(actions.shape)}")
        lp = self.log_probs.gather(1, actions.long().unsqueeze(1)).squeeze(1)
        return _reduce(lp, reduce)

    def entropy(self, reduce: Reduce = "none") -> torch.Tensor:
        """Per-pixel entropy in nats: (B, H, W) for "none", (B,) for "sum"/"mean"."""
        ent = -(self.probs * self.log_probs).sum(dim=1)
        return _reduce(ent, reduce)
